"""--api-key-file (router/api/auth.py): the format, errors that name the line but never a key, and a
comparison that looks at every key whichever one matches (constant time: no early exit)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardline.router.api import auth
from shardline.router.api.auth import INVALID, MISSING, ApiKeys, KeyFileError, Tenant, Unauthenticated

FILE = """
# production keys
alice:sk-alice-0000000001
alice:sk-alice-0000000002      # rotation: the same tenant twice
sk-bare-key-00000003
batch:sk-batch-0000000004 max_priority=-1
"""


def keys_of(tmp_path: Path, text: str) -> ApiKeys:
    path = tmp_path / "keys"
    path.write_text(text)
    return ApiKeys.load(path)


def test_the_file_format(tmp_path: Path) -> None:
    keys = keys_of(tmp_path, FILE)
    assert keys.authenticate("Bearer sk-alice-0000000001") == Tenant("alice")
    assert keys.authenticate("bearer  sk-alice-0000000002 ") == Tenant("alice")
    assert keys.authenticate("Bearer sk-bare-key-00000003") == Tenant("line-5")
    assert keys.authenticate("BEARER sk-batch-0000000004") == Tenant("batch", max_priority=-1)
    assert keys.tenants == ["alice", "batch", "line-5"]


@pytest.mark.parametrize("header, reason", [
    (None, MISSING), ("", MISSING), ("Bearer", MISSING), ("Bearer   ", MISSING), ("Basic sk-alice-0000000001", MISSING),
    ("sk-alice-0000000001", MISSING), ("Bearer sk-alice-000000000", INVALID), ("Bearer sk-alice-00000000011", INVALID),
    ("Bearer SK-ALICE-0000000001", INVALID), ("Bearer alice:sk-alice-0000000001", INVALID),
])
def test_missing_and_wrong_keys(tmp_path: Path, header, reason: str) -> None:
    with pytest.raises(Unauthenticated) as refused:
        keys_of(tmp_path, FILE).authenticate(header)
    assert str(refused.value) == reason


def test_every_key_is_compared_whichever_matches(tmp_path: Path, monkeypatch) -> None:
    keys = keys_of(tmp_path, FILE)
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append((len(a), len(b))) or real(a, b))
    for header in ("Bearer sk-alice-0000000001", "Bearer sk-batch-0000000004", "Bearer x" * 40):
        calls.clear()
        try:
            keys.authenticate(header)
        except Unauthenticated:
            pass
        assert calls == [(32, 32)] * 4, header  # digests of equal length: not even the length leaks


@pytest.mark.parametrize("text, message", [
    ("", "holds no key"),
    ("# nothing\n\n", "holds no key"),
    ("alice:short\n", "line 1: a key must be 16-512 characters"),
    ("alice:sk-123456789012\n", "line 1: a key must be 16-512 characters without ':', '#' or whitespace "
                               "(this one has 15)"),  # guessable: refused, though it fits the old 8
    ("al ice:sk-0000000000001\n", "line 1: a key must be 16-512"),
    ("bad/name:sk-0000000000001\n", "line 1: the tenant name must be"),
    ("a:sk-0000000000001\nb:sk-0000000000001\n", "line 2: the same key as line 1"),
    ("a:sk-0000000000001 max_priority=x\n", "line 1: unknown option 'max_priority'"),
    ("a:sk-0000000000001 weight=2\n", "line 1: unknown option 'weight'"),
    ("a:sk-0000000000001 max_priority=1\na:sk-0000000000002 max_priority=2\n", "line 2: tenant 'a' has another"),
])
def test_bad_files_are_refused_naming_the_line_not_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(KeyFileError) as refused:
        keys_of(tmp_path, text)
    assert message in str(refused.value)
    assert "sk-0000000000001" not in str(refused.value) and "short" not in str(refused.value)


def test_an_unreadable_file_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=r"--api-key-file .*missing: cannot read it"):
        ApiKeys.load(tmp_path / "missing")
