"""The root ``cnpsfs`` group: its options, and every command group registered on it.

Each command group is a module of its own (browse, importing, exporting, store_cmds,
image, commit, mounting, profile, service, bundle, build); they share only
:mod:`cnpsfs.cli.context`, so this is the one module that knows them all. It imports
none of them up front: a command's module loads when the command runs (or a help lists it),
so a command pays only for its own imports at start-up.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import click

from cnpsfs import __version__
from cnpsfs.cli.context import App, CnpsfsGroup, configure_logging
from cnpsfs.store.paths import default_store_path

#: Every command of the root group and the module of this package that defines it (its
#: ``COMMANDS``). A command's module is imported when the command runs or a help lists it:
#: ``cnpsfs status`` should not load what ``cnpsfs build`` needs. tests/test_cli_startup.py
#: checks this table against the modules.
COMMAND_MODULES = {
    **dict.fromkeys(("ls", "cat"), "browse"),
    **dict.fromkeys(("build", "packages", "query", "diff", "why"), "build"),
    "bundle": "bundle",
    "commit": "commit",
    "export": "exporting",
    **dict.fromkeys(("image", "inspect"), "image"),
    "import": "importing",
    **dict.fromkeys(("mount", "umount", "status", "upgrade", "unlink", "link", "rollback"), "mounting"),
    "profile": "profile",
    **dict.fromkeys(("push", "pull", "remote", "cache"), "remote"),
    "service": "service",
    "store": "store",
    **dict.fromkeys(("verify", "df", "gc", "tag"), "store_cmds"),
    **dict.fromkeys(("key", "sign", "sbom"), "trust"),
}

#: Groups that other modules add subcommands to: ``import oci`` and ``export oci``.
_SUBCOMMANDS = {"importing": ("import_group", "IMPORT_COMMANDS"), "exporting": ("export_group", "EXPORT_COMMANDS")}


class _RootGroup(CnpsfsGroup):
    """The root group, loading each command's module on first use (:data:`COMMAND_MODULES`)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *COMMAND_MODULES})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMAND_MODULES:
            load_commands(self, COMMAND_MODULES[cmd_name])
        return self.commands.get(cmd_name)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None,
                                                                              list[str]]:
        if args and args[0] not in COMMAND_MODULES:  # a typo: click's "did you mean" picks among all commands
            for name in sorted(set(COMMAND_MODULES.values())):
                load_commands(self, name)
        return super().resolve_command(ctx, args)


def load_commands(group: click.Group, name: str) -> None:
    """Register the commands of the module *name* of this package on *group*."""
    module: Any = importlib.import_module(f"cnpsfs.cli.{name}")
    for command in module.COMMANDS:
        group.add_command(command)
    if name in _SUBCOMMANDS:
        attr, commands = _SUBCOMMANDS[name]
        for command in getattr(importlib.import_module("cnpsfs.cli.oci"), commands):
            getattr(module, attr).add_command(command)


MAIN_HELP = """\
Mount root filesystems composed from content-addressed FileSets.

cnpsfs keeps files in a deduplicating content store: every file is cut into
content-defined chunks named by their BLAKE3 digest and kept zstd-compressed;
directories, FileSets (a named, versioned set of files such as a Debian package
or an OCI layer) and images (an ordered list of FileSets plus run config) are
canonical objects named by their digest. `cnpsfs mount` serves an image over
FUSE without extracting anything: directories are read when looked up, chunks
when their bytes are read, each verified before use.

\b
STORE
  --store DIR, else $CNPSFS_STORE, else /var/lib/cnpsfs (root) or
  $XDG_DATA_HOME/cnpsfs (other users).

\b
TRUST
  --policy FILE, else $CNPSFS_POLICY, else /etc/cnpsfs/policy.toml when it
  exists: which images mount, upgrade and reload may serve (signatures,
  revisions, Debian archive provenance; docs/trust.md). Without a policy
  every image is served, and `cnpsfs status` says it is unverified.

\b
REFERENCES
  blake3:<hex>     a digest; a unique prefix of 4 or more hex digits is enough
  NAME@VERSION     a tag, e.g. debian.org/bash@5.2.15-2+b7_amd64
  NAME             the most recently tagged version of NAME

\b
EXIT STATUS
  0 success, 1 failure (the message names the culprit), 2 usage error.

\b
EXAMPLES
  cnpsfs import dir ./rootfs --name example.org/rootfs --version 1
  cnpsfs import tar layer.tar.gz --name example.org/layer --version 1
  cnpsfs ls -l example.org/rootfs /etc
  cnpsfs export tar example.org/rootfs@1 - | tar -t
  cnpsfs verify && cnpsfs df

Run `cnpsfs COMMAND --help` for each command's options. docs/cli.md has the
full reference.
"""


@click.group(cls=_RootGroup, help=MAIN_HELP, context_settings={"help_option_names": ["-h", "--help"],
                                                                   "max_content_width": 100})
@click.option("--store", "store_path", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Content store directory (default: $CNPSFS_STORE, /var/lib/cnpsfs for root).")
@click.option("--policy", "policy_arg", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Trust policy (default: $CNPSFS_POLICY, else /etc/cnpsfs/policy.toml if it exists).")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="warning",
              show_default=True, help="Logging threshold for messages on stderr.")
@click.version_option(__version__, prog_name="cnpsfs")
@click.pass_context
def main(ctx: click.Context, store_path: Path | None, policy_arg: str | None, debug: bool, log_level: str) -> None:
    configure_logging("debug" if debug else log_level)
    ctx.obj = App(store_path or default_store_path(), debug, policy_arg=policy_arg)
    ctx.call_on_close(ctx.obj.close)  # a cached store commits what it fetched

