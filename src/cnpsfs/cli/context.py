"""What every command module of the ``cnpsfs`` command line shares.

Every command resolves its store the same way and reports errors the same way: one
line on stderr naming the culprit, a non-zero exit, and a traceback only with --debug.
Machine-readable output (``--json``) goes to stdout; references a script wants (the
digest an import produced) are the last line of stdout.

The command modules (one per command group) import from here and from the layers below,
never from each other; :mod:`cnpsfs.cli.root` registers them all (an import-linter
contract in pyproject.toml keeps it so).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from cnpsfs.errors import CnpsfsError, UsageError
from cnpsfs.store.remotelimits import MAX_TIMEOUT

if TYPE_CHECKING:  # importing these layers costs start-up time: each is imported where it is used
    from cnpsfs import format as fmt
    from cnpsfs.fs.mounting import Mounted
    from cnpsfs.ingest.tree import ImportOptions
    from cnpsfs.store import HostedStore, LocalStore, Store
    from cnpsfs.trust import Checker


@dataclass
class App:
    """The root group's options; the store opens on first use.

    With ``--remote`` (:data:`remote_options`), the store is the local store in front of
    those remotes (:class:`cnpsfs.store.cached.CachedStore`): what is not local is fetched,
    verified, and kept.
    """

    store_path: Path
    debug: bool
    _store: HostedStore | None = None
    policy_arg: str | None = None  # --policy FILE
    remotes: tuple[str, ...] = ()
    remote_timeout: float | None = None
    cache_size: int | None = None

    def store(self, *, create: bool = False) -> HostedStore:
        if self._store is None:
            from cnpsfs.store import LocalStore

            local = LocalStore(self.store_path, create=create or bool(self.remotes))
            if self.remotes:
                from cnpsfs.store.cached import open_cached

                self._store = open_cached(local, self.remotes, timeout=self.remote_timeout,
                                          cache_size=self.cache_size)
            else:
                self._store = local
        return self._store

    def resolve_ahead(self, ref: str) -> None:
        """With ``--remote``: open the store now and begin looking *ref* up in the remote, so
        its round trips overlap what the command does before it needs the answer (a lazy
        mount: importing and preparing its daemon). Nothing without remotes."""
        if self.remotes:
            from cnpsfs.store.cached import CachedStore

            store = self.store()
            if isinstance(store, CachedStore):
                store.resolve_ahead(ref)

    def local_store(self) -> LocalStore:
        """The store on this host itself (a cached store's local part): what df and verify inspect."""
        from cnpsfs.store import LocalStore

        store = self.store()
        local = getattr(store, "local", store)
        assert isinstance(local, LocalStore)
        return local

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def checker(self) -> Checker | None:
        """Trust decisions under --policy, $CNPSFS_POLICY or /etc/cnpsfs/policy.toml (docs/trust.md);
        None without a policy (everything is served, unverified)."""
        from cnpsfs.trust.paths import policy_path

        path = policy_path(self.policy_arg)
        if path is None:
            return None
        from cnpsfs.trust.checker import Checker

        return Checker(path, (_merged_usr_derivation,))


def _merged_usr_derivation(store: Store, digest: bytes, fs: fmt.FileSet) -> bytes | None:
    """Imported only when a debian-provenance rule meets a merged-/usr view (mount start-up stays lean)."""
    from cnpsfs.debian.provenance import merged_usr_derivation

    return merged_usr_derivation(store, digest, fs)


pass_app = click.make_pass_decorator(App)


def _set_app(field: str) -> Any:
    def callback(ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        app = ctx.find_object(App)
        if app is not None and value not in (None, ()):
            if field == "cache_size":
                from cnpsfs.store.cached import parse_size

                value = parse_size(value)
            elif isinstance(value, float) and value != value:  # nan: FloatRange's comparisons let it through
                raise click.BadParameter("not a number", ctx=ctx, param=_param)
            setattr(app, field, tuple(value) if isinstance(value, (list, tuple)) else value)
        return value
    return callback


def remote_options(func: Any) -> Any:
    """``--remote`` (repeatable), ``--remote-timeout`` and ``--cache-size`` for commands that read images."""
    options = [
        click.option("--remote", "remotes", multiple=True, metavar="URL|NAME", expose_value=False,
                     callback=_set_app("remotes"),
                     help="Read what the local store lacks from this remote (docker://HOST/REPO, "
                          "http(s)://HOST/PATH, file:///DIR, or a name from remotes.toml); repeatable, "
                          "tried in order. Fetched blocks are kept in the local store."),
        click.option("--remote-timeout", type=click.FloatRange(min=0.1, max=MAX_TIMEOUT), default=None,
                     metavar="SECONDS", expose_value=False, callback=_set_app("remote_timeout"),
                     help="How long a read may wait for a remote, retries included (default: the "
                          "remote's timeout, 30)."),
        click.option("--cache-size", default=None, metavar="SIZE", expose_value=False,
                     callback=_set_app("cache_size"),
                     help="Bound the cache of fetched blocks (e.g. 2G; default: the store's "
                          "cache-size setting, else unbounded)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


#: What a command returns when its process has nothing left to do but exit: ``cnpsfs mount``,
#: once its daemon answers. The standalone CLI then ends at once (:func:`exit_now`).
EXIT_NOW = "exit now"


def exit_now() -> NoReturn:
    """Flush the output and end the process without the interpreter's teardown.

    Called once every context is closed (the store too). What is skipped is freeing every
    module and object one by one: for ``cnpsfs mount`` (pyfuse3, trio and the generation it
    composed before forking its daemon) that took 30–45 ms after the mount already answered.
    This process starts no threads and registers no atexit work beyond logging's.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    logging.shutdown()
    os._exit(0)


class CnpsfsGroup(click.Group):
    """Translates domain errors into one-line messages and exit codes."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,  # type: ignore[override]
             complete_var: str | None = None, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """Click's standalone mode, except that a usage error is one line, like every other error."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **kwargs)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `cnpsfs` or `cnpsfs import`: the help
                click.echo(exc.format_message())
                sys.exit(exc.exit_code)
            command = exc.ctx.command_path if exc.ctx is not None else "cnpsfs"
            message = exc.format_message().rstrip(".")
            click.echo(f"cnpsfs: error: {message[:1].lower()}{message[1:]} (see '{command} --help')", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("cnpsfs: error: aborted", err=True)
            sys.exit(1)
        if rv == EXIT_NOW:
            exit_now()
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CnpsfsError as exc:
            fail(ctx, str(exc), exc.exit_code)
        except KeyboardInterrupt:
            fail(ctx, "interrupted", 130)
        except BrokenPipeError:
            sys.stderr.close()
            sys.exit(1)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except OSError as exc:  # the machine's state (a full disk, EIO, a permission): not a bug
            fail(ctx, f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc), 1)
        except Exception as exc:
            fail(ctx, f"internal error: {type(exc).__name__}: {exc} (run with --debug for a traceback)", 70)


def fail(ctx: click.Context, message: str, code: int) -> NoReturn:
    """Print *message* as the command's one error line (with the traceback under --debug) and exit."""
    app = ctx.obj
    if isinstance(app, App) and app.debug:
        traceback.print_exc()
    click.echo(f"{'<3>' if stream_is_journal(sys.stderr) else ''}cnpsfs: error: {message}", err=True)
    sys.exit(code)


def stream_is_journal(stream: Any) -> bool:
    """Whether *stream* is the journal's (sd_journal_stream_fd: ``$JOURNAL_STREAM`` is its DEV:INODE).

    Such a stream understands a ``<N>`` syslog priority in front of each line (systemd's
    SyslogLevelPrefix=, on by default), so ``journalctl -p err`` finds our errors.
    """
    try:
        dev, ino = (int(part) for part in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


#: syslog(3) priorities of the logging levels, for the journal's ``<N>`` prefix.
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    def __init__(self, prefix: bool) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.prefix:
            return text
        priority = _SYSLOG_PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


def configure_logging(level: str) -> None:
    """Log lines on stderr: journald-style (level and logger) under systemd, else prefixed ``cnpsfs:``.

    When stderr is the journal's stream, each line also carries its syslog priority.
    """
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        handler.setFormatter(_JournalFormatter(stream_is_journal(sys.stderr)))
    else:
        handler.setFormatter(logging.Formatter("cnpsfs: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))


# --------------------------------------------------------------------------- output


#: The ``--json`` flag of a command whose output scripts read.
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def human_size(n: float) -> str:
    """Bytes as ``512 B``, ``1.5 KiB`` … ``2.0 TiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def jsonable(value: Any) -> Any:
    """FileSet and image metadata for JSON: bytes become (escaped) text, keys strings."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------- references and imports


def fileset_root(store: Store, ref: str) -> fmt.Entry:
    """The root directory entry of the FileSet *ref*; any other object is a usage error."""
    from cnpsfs.store import T_FILESET, TYPE_NAMES

    digest = store.resolve(ref)
    type_code = store.object_type(digest)
    if type_code == T_FILESET:
        return store.get_fileset(digest).root
    raise UsageError(f"{ref} is a {TYPE_NAMES.get(type_code or -1, 'object')}; expected a FileSet")


def default_name(path: str) -> str:
    """``localhost/<base name of path>``: the FileSet name when an import is given none."""
    base = os.path.basename(os.path.normpath(os.path.abspath(path))) or "root"
    clean = "".join(c if c.isalnum() or c in "._+-" else "-" for c in base) or "root"
    return f"localhost/{clean}"


def import_settings(name: str | None, version: str | None, sde: int | None, strip: bool,
                    default: str) -> ImportOptions:
    """The ImportOptions of ``--name``/``--version`` (checked as a tag) and the import flags."""
    from cnpsfs.ingest.tree import ImportOptions
    from cnpsfs.store import check_tag_name, check_tag_version

    if version and not name:
        raise UsageError("--version needs --name")
    name = name or default
    version = version or "latest"
    check_tag_name(name)
    check_tag_version(version)
    return ImportOptions(source_date_epoch=sde, strip_volatile=strip, name=name, version=version)


# --------------------------------------------------------------------------- live mounts


def control(mountpoint: str, request: dict[str, Any]) -> dict[str, Any]:
    """Send *request* to the daemon serving *mountpoint*; its answer without the ``ok`` flag."""
    from cnpsfs.fs.control import control_request
    from cnpsfs.fs.daemon import status_record

    record = status_record(os.path.realpath(mountpoint))
    if record.get("upperdir") and request["op"] != "status":
        raise CnpsfsError(f"{mountpoint} is writable: overlayfs does not allow its lower layers to change "
                          "under it; commit the upper directory and remount instead")
    if not record["alive"]:
        raise CnpsfsError(f"the daemon of {mountpoint} (pid {record['pid']}) is gone: run `cnpsfs umount`")
    response = control_request(record["control"], request)
    response.pop("ok", None)
    return response


def report_swap(mountpoint: str, result: dict[str, Any], as_json: bool) -> None:
    """What a live swap (upgrade, link, unlink, rollback, reload) did."""
    if as_json:
        emit_json(result)
        return
    click.echo(f"{mountpoint}: generation {result['generation']} in {result['seconds'] * 1000:.1f} ms "
               f"({result['changed_dirs']} changed, {result['shared_dirs']} shared directories; "
               f"{result['invalidated_entries']} names invalidated)")


def profile_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The profiles of an image (image.profiles.describe_profiles), one line each: ``profile ls``, ``inspect``."""
    lines = []
    for row in rows:
        if "problem" in row:
            lines.append(f"profile  {row['digest'][:23]}  unreadable: {row['problem']}")
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["created_ns"] / 1e9))
        lines.append(f"profile  {row['name']}  {row['entries']} paths ({row['files']} files, "
                     f"{human_size(row['bytes'])}), recorded {when}  ({row['digest'][:23]})")
    return lines


def recorded_line(result: dict[str, Any]) -> str:
    """What a recording stored (fs.record.record_profile's result), in one line."""
    return (f"recorded profile {result['name']} of {result['label']}: {result['entries']} paths "
            f"({result['directories']} directories, {result['files']} files, {human_size(result['bytes'])} in "
            f"{result['ranges']} ranges, {result['lookups']} other names) in {result['seconds']:.1f} s"
            + (" (truncated at the format's limits)" if result["truncated"] else ""))


def report_mounted(mounted: Mounted) -> None:
    record = mounted.record
    click.echo(f"mounted {mounted.label} at {record.mountpoint} (daemon pid {record.pid}, log {record.log_file})",
               err=True)
