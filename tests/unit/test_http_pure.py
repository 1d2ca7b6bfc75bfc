"""Pure parts of the HTTP face: range maths, validators, content types, settings, and
that the face imports neither pyfuse3 nor a store SDK."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from blobfs.errors import UsageError
from blobfs.fs.core import Version
from blobfs.http.face import content_type, etag_of, parse_range
from blobfs.http.pages import index, viewer
from blobfs.http.settings import build, is_loopback, parse_listen


@pytest.mark.parametrize(("header", "size", "want"), [
    ("bytes=0-9", 100, (0, 9)),
    ("bytes=90-", 100, (90, 99)),
    ("bytes=-10", 100, (90, 99)),
    ("bytes=-500", 100, (0, 99)),
    ("bytes=50-5000", 100, (50, 99)),
    ("bytes=100-", 100, "unsatisfiable"),
    ("bytes=-0", 100, "unsatisfiable"),
    ("bytes=-5", 0, "unsatisfiable"),
    ("bytes=9-3", 100, None),
    ("bytes=0-1,5-6", 100, None),
    ("items=0-1", 100, None),
    ("bytes=a-b", 100, None),
])
def test_parse_range(header: str, size: int, want: object) -> None:
    assert parse_range(header, size) == want


def test_validators_and_types() -> None:
    assert etag_of(Version(5, '"abc"', 0.0, False, 0)) == '"abc"'
    assert etag_of(Version(5, "abc", 0.0, True, 1)) == 'W/"abc+5"'
    assert etag_of(Version(0, None, 0.0, True, 1)) == 'W/"+0"'
    assert content_type("a/b.log") == "text/plain; charset=utf-8"
    assert content_type("notes.txt") == "text/plain; charset=utf-8"
    assert content_type("x.json") == "application/json"
    assert content_type("blob") == "application/octet-stream"


def test_settings(tmp_path: Path) -> None:
    assert parse_listen("127.0.0.1:80") == ("127.0.0.1", 80)
    assert parse_listen("[::1]:8080") == ("::1", 8080)
    assert parse_listen(":9") == ("", 9)
    for bad in ("8080", "host:0", "host:99999", "host:x"):
        with pytest.raises(UsageError):
            parse_listen(bad)
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("") and not is_loopback("0.0.0.0") and not is_loopback("example")
    with pytest.raises(UsageError, match="read token"):
        build("0.0.0.0:8080")
    tok = tmp_path / "t"
    tok.write_text("  s3cret \n")
    s = build("0.0.0.0:8080", read_token_file=str(tok))
    assert s.read_token == b"s3cret" and "s3cret" not in repr(s)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(UsageError, match="empty"):
        build("127.0.0.1:1", write_token_file=str(tmp_path / "empty"))
    with pytest.raises(UsageError, match="cannot read"):
        build("127.0.0.1:1", read_token_file=str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="go together"):
        build("127.0.0.1:1", cert=str(tok))
    with pytest.raises(UsageError, match="cannot load"):
        build("127.0.0.1:1", cert=str(tok), key=str(tok))


def test_pages_escape_keys_and_tokens() -> None:
    page = viewer("a/</script><b>.log", 'x"</script>')
    assert "</script><b>" not in page.split("<script>", 1)[1].rsplit("</script>", 1)[0]
    html = index("", [{"name": "<i>.log", "size": 1, "mtime": 0, "dir": False}], None)
    assert "<i>.log" not in html and "&lt;i&gt;.log" in html


def test_the_face_imports_no_fuse_and_no_sdk() -> None:
    code = ("import sys, blobfs.http, blobfs.http.face, blobfs.serve\n"
            "bad = [m for m in ('pyfuse3', 'boto3', 'botocore', 'azure.storage.blob')"
            " if m in sys.modules]\n"
            "assert not bad, bad\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0, res.stderr
