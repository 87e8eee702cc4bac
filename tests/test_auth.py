"""Login: scrypt hashes, the Authenticator Gradio calls, and the hash-password command."""

from __future__ import annotations

import base64
import hashlib
import io
import subprocess
import sys
from pathlib import Path

import pytest

from modules import auth
from modules.auth import Authenticator, hash_password, is_password_hash, verify_password

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def secret_hash() -> str:
    return hash_password("correct horse")


def test_round_trip_and_format(secret_hash: str) -> None:
    scheme, n, r, p, salt, key = secret_hash.split("$")
    assert (scheme, n, r, p) == ("scrypt", str(2**14), "8", "1")
    assert len(base64.b64decode(salt)) == 16 and len(base64.b64decode(key)) == 32
    assert verify_password("correct horse", secret_hash)
    assert not verify_password("correct horse ", secret_hash)
    assert not verify_password("Correct horse", secret_hash)
    assert not verify_password("", secret_hash)


def test_each_hash_has_its_own_salt(secret_hash: str) -> None:
    again = hash_password("correct horse")
    assert again != secret_hash and again.split("$")[4] != secret_hash.split("$")[4]
    assert verify_password("correct horse", again)


def test_unicode_password() -> None:
    hashed = hash_password("密码 pässwörd")
    assert verify_password("密码 pässwörd", hashed) and not verify_password("密码 passwörd", hashed)


def test_empty_password_cannot_be_hashed() -> None:
    with pytest.raises(ValueError):
        hash_password("")


def _with(hashed: str, index: int, value: str) -> str:
    parts = hashed.split("$")
    parts[index] = value
    return "$".join(parts)


def malformed(good: str) -> list[str]:
    salt = good.split("$")[4]
    return [
        "", "scrypt$", "plaintext", "correct horse", "$".join(["scrypt"] * 6), good + "$", good[:-4],
        _with(good, 0, "bcrypt"),
        _with(good, 4, "not*base64!"), _with(good, 5, "QUJD="),  # bad characters; bad padding
        _with(good, 5, base64.b64encode(b"short").decode()),  # key too short
        _with(good, 5, base64.b64encode(b"k" * 48).decode()),  # or too long
        _with(good, 4, base64.b64encode(b"salt").decode()),  # salt too short
        _with(good, 4, ""),
        _with(good, 1, str(2**40)), _with(good, 1, "1" + "0" * 500),  # absurd n: refused, not computed
        _with(good, 1, "1000"), _with(good, 1, "1"), _with(good, 1, "0"), _with(good, 1, "-16384"),
        _with(good, 1, "١٦٣٨٤"),  # Arabic-Indic digits that int() would accept
        _with(good, 2, "0"), _with(good, 2, str(2**20)), _with(good, 3, str(2**30)), _with(good, 3, "0"),
        _with(_with(good, 1, str(2**17)), 2, "8"),  # 128 MiB
        f"scrypt$16384$8$1${salt}",
    ]


def test_malformed_hashes_are_refused_without_raising_or_deriving_a_key(
        secret_hash: str, monkeypatch: pytest.MonkeyPatch) -> None:
    derived: list[int] = []
    real = auth._scrypt
    monkeypatch.setattr(auth, "_scrypt", lambda pw, salt, n, *rest: derived.append(n) or real(pw, salt, n, *rest))
    for bad in malformed(secret_hash):
        assert verify_password("correct horse", bad) is False, bad
        assert is_password_hash(bad) is False, bad
    assert derived == []  # refused by parsing alone: an absurd n never reaches scrypt
    assert verify_password("correct horse", secret_hash) and derived == [2**14]


def test_non_string_values_are_refused(secret_hash: str) -> None:
    assert not is_password_hash(None)  # type: ignore[arg-type]
    assert not verify_password(None, secret_hash)  # type: ignore[arg-type]


def test_other_parameters_within_the_caps_are_accepted(secret_hash: str) -> None:
    assert is_password_hash(secret_hash)
    salt = b"0123456789abcdef0123"
    key = hashlib.scrypt(b"pw", salt=salt, n=1024, r=4, p=2, dklen=32)
    other = f"scrypt$1024$4$2${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"
    assert is_password_hash(other)
    assert verify_password("pw", other) and not verify_password("pW", other)


# -- Authenticator --

def test_authenticator_accepts_only_the_right_user_and_password(secret_hash: str) -> None:
    check = Authenticator({"alice": secret_hash, "bob": hash_password("bob's")})
    assert check("alice", "correct horse") and check("bob", "bob's")
    assert not check("alice", "bob's") and not check("bob", "correct horse")
    assert not check("carol", "correct horse") and not check("Alice", "correct horse")
    assert not check("", "") and not check(None, "correct horse")  # type: ignore[arg-type]
    assert check.users == ["alice", "bob"]
    assert secret_hash not in repr(check)


def test_unknown_users_cost_a_full_verification(secret_hash: str, monkeypatch: pytest.MonkeyPatch) -> None:
    check = Authenticator({"alice": secret_hash})
    calls: list[str] = []
    real = auth.verify_password
    monkeypatch.setattr(auth, "verify_password", lambda pw, hashed: calls.append(hashed) or real(pw, hashed))
    assert not check("mallory", "correct horse")
    assert not check("alice", "wrong")
    assert len(calls) == 2
    unknown, known = calls
    assert known == secret_hash
    # the dummy has the same cost parameters as a real hash, so both take as long
    assert is_password_hash(unknown) and unknown.split("$")[1:4] == known.split("$")[1:4]


def test_authenticator_refuses_plaintext_passwords() -> None:
    with pytest.raises(ValueError, match="'alice'") as info:
        Authenticator({"alice": "hunter2"})
    assert "hunter2" not in str(info.value)


# -- the hash-password command --

def run_cli(stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "modules.auth"], input=stdin, capture_output=True, check=False,
                          text=True, cwd=ROOT, timeout=60)


def test_cli_prints_a_hash_of_the_piped_line() -> None:
    result = run_cli("secret\n")
    assert result.returncode == 0, result.stderr
    hashed = result.stdout.strip()
    assert result.stdout == hashed + "\n"  # only the hash
    assert verify_password("secret", hashed) and not verify_password("secret\n", hashed)


@pytest.mark.parametrize("stdin", ["", "\n"])
def test_cli_refuses_an_empty_password(stdin: str) -> None:
    result = run_cli(stdin)
    assert result.returncode == 1
    assert result.stdout == "" and "empty" in result.stderr


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("typed, code", [(["pw one", "pw one"], 0), (["pw one", "pw two"], 1), (["", ""], 1)])
def test_cli_on_a_terminal_asks_twice(typed: list[str], code: int, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    answers = iter(typed)
    monkeypatch.setattr(sys, "stdin", _Terminal())
    monkeypatch.setattr(auth.getpass, "getpass", lambda prompt="": next(answers))
    assert auth.main([]) == code
    out, err = capsys.readouterr()
    if code == 0:
        assert verify_password(typed[0], out.strip())
    else:
        assert out == "" and err
    assert next(answers, None) is None  # both prompts were asked
