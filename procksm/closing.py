"""One context-manager protocol for procksm's resources (fds, sockets, stores)."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closing:
    """``with resource:`` calls :meth:`close` on every exit path; subclasses define it."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
