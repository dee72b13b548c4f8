"""The root ``cnpsfs`` group: its options, and every command group registered on it.

Each command group is a module of its own (browse, importing, exporting, store_cmds,
image, commit, mounting, profile, service, bundle, build); they share only
:mod:`cnpsfs.cli.context`, so this is the one module that knows them all.
"""

from __future__ import annotations

from pathlib import Path

import click

from cnpsfs import __version__
from cnpsfs.cli import (
    browse,
    build,
    bundle,
    commit,
    exporting,
    image,
    importing,
    mounting,
    oci,
    profile,
    remote,
    service,
    store,
    store_cmds,
    trust,
)
from cnpsfs.cli.context import App, CnpsfsGroup, configure_logging
from cnpsfs.store import default_store_path

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


@click.group(cls=CnpsfsGroup, help=MAIN_HELP, context_settings={"help_option_names": ["-h", "--help"],
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


for _module in (importing, browse, exporting, store_cmds, store, image, commit, mounting, profile, service, bundle,
                build, oci, trust, remote):
    for _command in _module.COMMANDS:
        main.add_command(_command)
for _command in oci.IMPORT_COMMANDS:
    importing.import_group.add_command(_command)
for _command in oci.EXPORT_COMMANDS:
    exporting.export_group.add_command(_command)
