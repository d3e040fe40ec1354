"""The one exception type that reaches the user as a message, never as a traceback."""
from __future__ import annotations

import errno as _errno


class UserError(Exception):
    """Bad input or environment: the message names the file or option and what to do."""


def os_error(path, e: OSError, doing: str) -> UserError:
    """An OSError as what it is: what was being done, the path, the errno name and text.
    Running out of a resource is said plainly, never as damage to a file that is fine."""
    name = _errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__
    hint = {_errno.EMFILE: "; raise the open-file limit (ulimit -n) or use fewer --workers",
            _errno.ENFILE: "; the system's open-file table is full",
            _errno.ENOSPC: "; free space there and run the same command again",
            _errno.EACCES: "; check the permissions", _errno.EROFS: "; the file system is read-only",
            _errno.EIO: "; an I/O error from the storage: check the disk"}.get(e.errno, "")
    return UserError(f"{path}: cannot {doing} ({name}: {e.strerror or e}){hint}")
