"""The one errno table: file-system errors a write can hit that the user can fix, in words (a leaf: stdlib only).

Used by the store's write guard (``store.format.io_guard``), the up-front writability check
(``stages/config.py::check_writable``) and the CLI's last-resort mapping of an OSError (``cli/main.py``).
"""

from __future__ import annotations

import errno

WRITE_REASONS: dict[int, str] = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only",
}
