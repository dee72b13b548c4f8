"""Which policy file applies, if any: the one question every mount asks, kept light.

Every ``cnpsfs mount`` asks it; when the answer is "none" nothing else of cnpsfs.trust
is imported, so a host without a policy mounts exactly as fast as before.
"""

from __future__ import annotations

import os
from pathlib import Path

from cnpsfs.errors import UsageError

DEFAULT_POLICY_PATH = Path("/etc/cnpsfs/policy.toml")
POLICY_ENV = "CNPSFS_POLICY"


class PolicyError(UsageError):
    """The policy file (or a key file it names) is unusable; the message names it."""


def policy_path(explicit: str | Path | None, environ: os._Environ[str] | dict[str, str] | None = None,
                default: Path = DEFAULT_POLICY_PATH) -> Path | None:
    """``--policy FILE``, else ``$CNPSFS_POLICY``, else /etc/cnpsfs/policy.toml when it exists.

    None means no policy: images are served as before, and reported as unverified. A file
    named explicitly (option or variable) must exist: a typo must not turn checking off.
    """
    env = os.environ if environ is None else environ
    chosen = explicit if explicit is not None else env.get(POLICY_ENV) or None
    if chosen is not None:
        path = Path(chosen)
        if not path.is_file():
            raise PolicyError(f"policy {path} does not exist (named by {'--policy' if explicit else '$' + POLICY_ENV})")
        return path.absolute()
    return default if default.is_file() else None
