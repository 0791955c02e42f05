"""What depends on the CPU architecture, apart from the generic code (as CRIU's compel
keeps ``compel/arch/x86`` apart from ``compel/src/lib``).

procksm supports x86_64 only: :mod:`procksm.arch.x86_64` holds its system call numbers,
the register structure and the argument registers, the instruction patterns injected
calls run through, and the layout of the signal frames they return by. The generic
sequence (seize, stop, inject, resume) is :mod:`procksm.attach.session` and the parts it names;
the raw ptrace calls are :mod:`procksm.attach.inject`. A port to another architecture adds a
sibling module.
"""
