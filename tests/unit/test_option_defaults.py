"""One source of option defaults (issue 14, item 4): every `-o` option is a `MountConfig`
field whose default `--help` shows, `-o` parses back to, and `StoreConfig` shares."""

from __future__ import annotations

import os
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from blobfs.config import (
    OPTIONS,
    MountConfig,
    StoreConfig,
    options_help,
    parse_options,
    shown_default,
)

FIELDS = {f.name: f for f in fields(MountConfig)}


def test_the_options_are_the_config_fields_with_their_defaults() -> None:
    assert set(FIELDS) - set(OPTIONS) == {"source", "mountpoint", "foreground", "debug"}
    assert list(OPTIONS) == [name for name in FIELDS if name in OPTIONS], "help order"
    for name, opt in OPTIONS.items():
        field = FIELDS[name]
        if field.default is MISSING:  # worked out at mount time: the mounting user
            assert opt.default is None and field.default_factory is not MISSING, name
        else:
            assert opt.default == field.default, name


@pytest.mark.parametrize("name", list(OPTIONS))
def test_the_default_help_shows_parses_back_to_the_configs(name: str) -> None:
    opt = OPTIONS[name]
    default = MountConfig.build("file:///x", "/", {})
    if opt.default is None:
        # No value to show: unset, or the mounting user's ids.
        want = {"uid": os.getuid(), "gid": os.getgid()}.get(name)
        assert getattr(default, name) == want
        return
    text = shown_default(opt)
    [line] = [line for line in options_help().splitlines() if line.split()[0] == name]
    if "(default" not in opt.help:
        assert line.endswith(f"(default: {text})")
    value = parse_options([f"{name}={text}"])[name]
    assert (Path(value) if name == "cache_dir" else value) == getattr(default, name)
    assert MountConfig.build("file:///x", "/", {name: value}) == default


def test_the_store_config_defaults_are_the_mounts() -> None:
    assert StoreConfig() == MountConfig.build("file:///x", "/", {}).store
