"""Trust: who made an image, whether this host may serve it, and where its packages came from.

The layer's narrow face (docs/trust.md). It sits between ``image/`` and ``fs/``: it reads
the store and composes nothing; ``fs/`` (the daemon), ``debian/`` (build, provenance
refetch) and the CLI call it.

- :class:`Checker` / :func:`check_image`: trust decisions (``pull`` calls ``check_image``);
- :mod:`.keys`: Ed25519 keys in OpenSSH's formats; :mod:`.signature`: signature objects;
- :mod:`.policy`: the TOML policy; :mod:`.provenance`: Debian archive provenance chains.

The names below load their module on first use (PEP 562): every mount imports this
package, and a mount without a policy should not pay for the rest of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cnpsfs import lazy

if TYPE_CHECKING:
    from cnpsfs.trust.checker import Checker, Decision, TrustError, check_image, subject_of
    from cnpsfs.trust.paths import PolicyError, policy_path
    from cnpsfs.trust.policy import Policy, load_policy

_WHERE = {"Checker": "checker", "Decision": "checker", "TrustError": "checker", "check_image": "checker",
          "subject_of": "checker", "Policy": "policy", "PolicyError": "paths", "load_policy": "policy",
          "policy_path": "paths"}

__all__ = ["Checker", "Decision", "Policy", "PolicyError", "TrustError", "check_image", "load_policy", "policy_path",
           "subject_of"]


def __getattr__(name: str) -> Any:
    return lazy.load(__name__, _WHERE, name)
