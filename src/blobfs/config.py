"""Mount options: their names, defaults, parsing and the frozen configuration values.

This module owns the option table that `--help`, `-o` parsing and the docs share. It knows
nothing of FUSE or of any store SDK.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from blobfs.budget import Budget
from blobfs.errors import UsageError

MiB = 1 << 20
#: Largest duration option: about 31 years (trio and the kernel take it; `inf` would not).
MAX_SECONDS = 1e9
MAX_ID = (1 << 32) - 2

_SIZE_RE = re.compile(r"^(\d+)([kmgt]i?b?|b)?$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'8M', '8MiB', '512k', '1048576' -> bytes."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise ValueError(f"not a size: {text!r} (use a number with an optional K, M, G suffix)")
    unit = (m.group(2) or "").lower()[:1]
    return int(m.group(1)) * _UNITS[unit]


def parse_seconds(text: str) -> float:
    """'1', '0.5s' -> seconds; nan, inf and negative values are refused."""
    try:
        value = float(text.removesuffix("s"))
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or value > MAX_SECONDS:
        raise ValueError(f"not a duration: {text!r} (use seconds from 0 to {MAX_SECONDS})")
    return value


def parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("", "1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def parse_mode(text: str) -> int:
    """Octal permission bits, 0 to 7777."""
    digits = text.removeprefix("0o")
    if not re.fullmatch(r"[0-7]{1,5}", digits):
        raise ValueError(f"not an octal mode: {text!r} (use 0 to 7777, e.g. 644)")
    value = int(digits, 8)
    if value > 0o7777:
        raise ValueError(f"mode {text} is above 7777")
    return value


def parse_id(text: str) -> int:
    """A uid or gid: 0 to 2^32-2 ((uid_t)-1 means "no change" to the kernel)."""
    if not text.isdigit() or int(text) > MAX_ID:
        raise ValueError(f"not a user or group id: {text!r} (use 0 to {MAX_ID})")
    return int(text)


def parse_nonempty(text: str) -> str:
    if not text.strip():
        raise ValueError("it is empty (leave the option out to get the default)")
    return text


def parse_close(text: str) -> str:
    if text not in ("sync", "async"):
        raise ValueError(f"close must be 'sync' or 'async', not {text!r}")
    return text


def _default_cache_dir() -> str:
    if os.geteuid() == 0:
        return "/var/cache/blobfs"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "blobfs")


@dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[str], Any]
    #: None where the default is worked out at mount time (uid, gid).
    default: Any
    help: str
    flag: bool = False  # may be given without '=value'


_OPTION = "blobfs.option"
_T = TypeVar("_T")


def option(default: _T, parse: Callable[[str], Any], help: str, *, flag: bool = False) -> _T:
    """A `MountConfig` field that is also a `-o` option: its default lives only here."""
    return field(default=default, metadata={_OPTION: (parse, help, flag)})


def option_factory(factory: Callable[[], _T], parse: Callable[[str], Any], help: str) -> _T:
    """`option` for a default worked out when the config is built (the mounting user)."""
    return field(default_factory=factory, metadata={_OPTION: (parse, help, False)})


#: Options mount(8), fstab or systemd pass that mean nothing to blobfs (semantics §5).
#: mount.fuse3 itself adds `dev,suid` (or passes `nodev,nosuid`) and mount(8) adds `rw`.
IGNORED_OPTIONS = {
    "_netdev", "_rnetdev", "nofail", "defaults", "rw", "auto", "noauto", "user", "users",
    "nouser", "owner", "group", "exec", "noexec", "suid", "nosuid", "dev", "nodev", "atime",
    "noatime", "relatime", "norelatime", "strictatime", "nostrictatime", "lazytime",
    "nolazytime", "diratime", "nodiratime", "iversion", "noiversion", "mand", "nomand",
    "symfollow", "nosymfollow", "async", "sync", "dirsync", "loud", "silent",
}
#: Valued options of mount(8), SELinux or FUSE that blobfs decides itself or ignores.
IGNORED_VALUED_OPTIONS = {
    "comment", "subtype", "fsname", "context", "fscontext", "defcontext", "rootcontext",
}
ALIASES = {"ro": ("read_only", "1")}


def parse_options(items: list[str]) -> dict[str, Any]:
    """Parse '-o a=b,c' strings into {name: value}; raise UsageError on a bad one."""
    values: dict[str, Any] = {}
    given: dict[str, str] = {}
    for item in items:
        for raw in filter(None, (p.strip() for p in item.split(","))):
            name, eq, text = raw.partition("=")
            if name in IGNORED_OPTIONS or name in IGNORED_VALUED_OPTIONS or \
                    name.startswith("x-"):
                continue
            if name in ALIASES:
                if eq:
                    raise UsageError(f"option '{name}' takes no value (write '{name}', not "
                                     f"'{raw}')")
                alias = name
                name, text = ALIASES[name]
                eq = "="
            else:
                alias = name
            if name in given:
                raise UsageError(f"option '{name}' is given twice ('{given[name]}' and "
                                 f"'{raw}'): keep one")
            given[name] = raw if alias == name else alias
            opt = OPTIONS.get(name)
            if opt is None:
                raise UsageError(
                    f"unknown option '{name}': see 'blobfs mount --help' for the list"
                )
            if not eq and not opt.flag:
                raise UsageError(f"option '{name}' needs a value: -o {name}=VALUE")
            try:
                values[name] = opt.parse(text)
            except ValueError as exc:
                raise UsageError(f"bad value for option '{name}': {exc}") from None
    return values


@dataclass(frozen=True)
class MountConfig:
    """One mount's configuration. Each field made with `option` is the `-o` option of
    that name (`OPTIONS` is derived from these fields, in this order)."""

    source: str
    mountpoint: Path
    block_size: int = option(
        8 * MiB, parse_size, "bytes per staged block; full blocks upload as soon as they fill")
    commit_interval: float = option(
        1.0, parse_seconds, "seconds between background commits while a file has pending data")
    metadata_ttl: float = option(1.0, parse_seconds, "seconds attributes (size, etag) are cached")
    list_ttl: float = option(1.0, parse_seconds, "seconds directory listings are cached")
    readahead_max: int = option(64 * MiB, parse_size, "largest sequential prefetch window")
    cache_size: int = option(256 * MiB, parse_size, "size of the shared read block cache")
    cache_dir: Path = option(
        Path(_default_cache_dir()), parse_nonempty,
        "spool and cache directory, created 0700; an existing one must be owned by the "
        "mounting user and not writable by others")
    retry_timeout: float = option(
        60.0, parse_seconds, "seconds transient store errors are retried")
    shutdown_timeout: float = option(
        300.0, parse_seconds, "seconds the final commit may take at unmount")
    endpoint: str | None = option(
        None, str, "store endpoint URL (S3-compatible server, Azure endpoint)")
    account: str | None = option(None, str, "Azure storage account name")
    api_version: str | None = option(
        None, str, "Azure REST API version to pin (default: one Azurite accepts)")
    close: str = option(
        "sync", parse_close,
        "'sync': close waits for the commit; 'async': close returns once spooled")
    memory_limit: int = option(
        512 * MiB, parse_size,
        "memory for file data: cache_size + 12 x block_size for uploads + 2 MiB per "
        "FUSE request served at once (what is left, 4 to 32 requests)")
    metrics: str | None = option(
        None, parse_nonempty,
        "serve Prometheus metrics on HOST:PORT (':PORT' alone listens on every interface:"
        " say so explicitly), or write them to a file path; off when unset")
    uid: int = option_factory(
        os.getuid, parse_id, "owner of every file (default: the mounting user)")
    gid: int = option_factory(
        os.getgid, parse_id, "group of every file (default: the mounting user's group)")
    file_mode: int = option(0o644, parse_mode, "permission bits of files (octal)")
    dir_mode: int = option(0o755, parse_mode, "permission bits of directories (octal)")
    allow_other: bool = option(
        False, parse_bool, "let other users use the mount (see the README's Security section)",
        flag=True)
    read_only: bool = option(False, parse_bool, "refuse every change", flag=True)
    # The HTTP face (blobfs.http, docs/design/http.md); `blobfs serve` takes them too.
    http: str | None = option(None, str, "also serve the mount over HTTP on HOST:PORT")
    http_read_token_file: str | None = option(
        None, str, "file holding the bearer token GET/HEAD need (required off loopback)")
    http_write_token_file: str | None = option(
        None, str, "file holding the bearer token PUT needs (no file: PUT is refused)")
    http_cert: str | None = option(None, str, "PEM certificate (chain) file: serve HTTPS")
    http_key: str | None = option(None, str, "PEM private key file for http_cert")
    http_cors: str | None = option(
        None, str,
        "origin allowed cross-origin for GET, HEAD and PUT; unset: any origin, "
        "GET and HEAD only")
    foreground: bool = False
    debug: bool = False

    @classmethod
    def build(cls, source: str, mountpoint: str, options: Mapping[str, Any],
              **extra: Any) -> MountConfig:
        values = {k: v for k, v in options.items() if v is not None}
        if "cache_dir" in values:
            values["cache_dir"] = Path(values["cache_dir"])
        mnt = Path(os.path.realpath(mountpoint)) if os.path.isdir(mountpoint) else \
            Path(os.path.abspath(mountpoint))
        cfg = cls(source=source, mountpoint=mnt, **values, **extra)
        if cfg.block_size < 64 << 10:
            raise UsageError("block_size must be at least 64K")
        if cfg.commit_interval <= 0:
            raise UsageError("commit_interval must be greater than 0")
        cfg.budget.check()
        return cfg

    @property
    def budget(self) -> Budget:
        """How memory_limit is shared out (semantics §5)."""
        return Budget(self.memory_limit, self.cache_size, self.block_size)

    @property
    def store(self) -> StoreConfig:
        return StoreConfig(
            endpoint=self.endpoint,
            account=self.account,
            api_version=self.api_version,
            retry_timeout=self.retry_timeout,
            block_size=self.block_size,
        )


#: MountConfig's defaults by field name (None for those worked out at mount time).
_DEFAULTS: dict[str, Any] = {
    f.name: None if f.default is MISSING else f.default for f in fields(MountConfig)}

#: Every `-o` option, from MountConfig's `option` fields: their one list of defaults.
OPTIONS: dict[str, Option] = {
    f.name: Option(f.name, f.metadata[_OPTION][0], _DEFAULTS[f.name], f.metadata[_OPTION][1],
                   f.metadata[_OPTION][2])
    for f in fields(MountConfig) if _OPTION in f.metadata
}


@dataclass(frozen=True)
class StoreConfig:
    """What a store adapter needs: endpoint, account, retries (MountConfig's defaults)."""

    endpoint: str | None = None
    account: str | None = None
    api_version: str | None = None
    retry_timeout: float = _DEFAULTS["retry_timeout"]
    block_size: int = _DEFAULTS["block_size"]


def shown_default(opt: Option) -> str:
    """An option's default as `--help` shows it (and as `-o` would take it back)."""
    default = opt.default
    if opt.name == "cache_dir":
        return _default_cache_dir()
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, int) and default >= MiB:
        return f"{default // MiB}M"
    if isinstance(default, int) and opt.name.endswith("mode"):
        return oct(default)[2:]
    return "none" if default is None else str(default)


def options_help() -> str:
    lines = []
    for opt in OPTIONS.values():
        said = "(default" in opt.help  # the help text names its own default
        lines.append(f"  {opt.name:<17} {opt.help}"
                     + ("" if said else f" (default: {shown_default(opt)})"))
    return "\n".join(lines)
