from __future__ import annotations

from procksm.cli import main

raise SystemExit(main())
