"""Start-up guards: what ``cnpsfs status`` and ``cnpsfs mount`` import.

Every command is a fresh Python process, so a module imported at start-up is paid on each
run (``cnpsfs status`` is the floor of every live swap; ``cnpsfs mount`` of every container
start), and after a cache drop each module is files read from disk. These tests run the
real entry point in a subprocess and list what it loaded; they take about a second.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cnpsfs.cli import root

#: What no command needs until it uses it: the other commands' modules, the layers that
#: ingest, build or sign, the remote transport, and the event loop and FUSE.
NOT_AT_START = (
    "cnpsfs.cli.build", "cnpsfs.cli.browse", "cnpsfs.cli.importing", "cnpsfs.cli.oci", "cnpsfs.cli.remote",
    "cnpsfs.cli.trust", "cnpsfs.ingest", "cnpsfs.debian", "cnpsfs.oci", "cnpsfs.export", "cnpsfs.trust.checker",
    "cnpsfs.store.remote", "cnpsfs.transport", "urllib3", "cryptography", "pyfastcdc",
)
#: What ``cnpsfs status`` (a control-socket client) never needs: the store and the daemon's side.
NOT_IN_STATUS = (
    "cnpsfs.store.local", "cnpsfs.format.objects", "sqlite3", "zstandard", "cbor2", "blake3", "pyfuse3", "trio",
    "cnpsfs.fs.mount", "cnpsfs.image", "subprocess", "shutil", "_hashlib",
)

_LIST_MODULES = """
import json, sys
from cnpsfs.cli import main
try:
    main(sys.argv[1:], prog_name="cnpsfs")
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)))
"""


def _loaded(*args: str) -> set[str]:
    """The modules a ``cnpsfs ARGS`` process has loaded when it ends (its output discarded)."""
    proc = subprocess.run([sys.executable, "-c", _LIST_MODULES, *args], capture_output=True, text=True, timeout=60,
                          check=True)
    return set(json.loads(proc.stdout.splitlines()[-1]))


def _offenders(loaded: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden))


def test_the_command_table_names_every_command_of_its_module() -> None:
    """root.COMMAND_MODULES is how a command is found without importing every module: it must
    name each command of each module, and nothing else."""
    expected: dict[str, str] = {}
    for name in sorted(set(root.COMMAND_MODULES.values())):
        module = importlib.import_module(f"cnpsfs.cli.{name}")
        expected.update(dict.fromkeys((c.name for c in module.COMMANDS), name))
    assert expected == root.COMMAND_MODULES
    modules = {p.stem for p in Path(root.__file__).parent.glob("*.py")}
    assert modules - {"__init__", "__main__", "root", "context", "oci"} == set(root.COMMAND_MODULES.values())


def test_status_loads_neither_the_store_nor_the_daemon(tmp_path: Path) -> None:
    # No mount is recorded there: the command fails after the path a real status takes to
    # the control socket (cli.context.control: fs.control, fs.daemon.status_record).
    loaded = _loaded("status", str(tmp_path), "--json")
    assert "cnpsfs.cli.mounting" in loaded and "cnpsfs.fs.control" in loaded
    assert _offenders(loaded, NOT_AT_START + NOT_IN_STATUS) == []


def test_help_lists_every_command_without_the_layers_below() -> None:
    loaded = _loaded("--help")
    assert {f"cnpsfs.cli.{m}" for m in root.COMMAND_MODULES.values()} <= loaded
    assert _offenders(loaded, ("pyfuse3", "trio", "pyfastcdc", "urllib3", "cryptography", "cnpsfs.ingest")) == []


def test_mount_and_its_daemon_import_only_what_serving_needs() -> None:
    """The modules a mount imports before it forks its daemon (the daemon imports nothing
    else until a request needs it): FUSE and the store, not ingest, the remote transport,
    signatures or the other commands."""
    code = ("import json, sys; import cnpsfs.cli.mounting, cnpsfs.fs.mounting, cnpsfs.fs.mount, cnpsfs.fs.daemon;"
            " print(json.dumps(sorted(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    loaded = set(json.loads(proc.stdout))
    assert {"pyfuse3", "trio", "cnpsfs.store.local"} <= loaded
    assert _offenders(loaded, (*NOT_AT_START, "tomllib")) == []


def test_a_remote_mount_reads_no_toml_without_a_remotes_file(tmp_path: Path) -> None:
    """``mount --remote URL`` with no remotes.toml anywhere: the TOML parser is not imported
    (a lazy mount's start pays for every module). The remote refuses the connection, so the
    command ends after its store and remote are open and the lookup has failed."""
    if Path("/etc/cnpsfs/remotes.toml").exists():
        pytest.skip("this host has /etc/cnpsfs/remotes.toml")
    (tmp_path / "mnt").mkdir()
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    proc = subprocess.run([sys.executable, "-c", _LIST_MODULES, "--store", str(tmp_path / "store"), "mount",
                           "--remote", "http://127.0.0.1:9/none", "example.org/x@1", str(tmp_path / "mnt")],
                          capture_output=True, text=True, timeout=60, check=True, env=env)
    loaded = set(json.loads(proc.stdout.splitlines()[-1]))
    assert "cnpsfs.store.remoteconf" in loaded and "urllib3" in loaded  # the remote path ran
    assert "tomllib" not in loaded
