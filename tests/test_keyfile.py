"""Shared-secret key files: read at start-up, refused with a clear reason."""

from __future__ import annotations

import os

import pytest

from uwsgi_fastrouter.keyfile import KEY_FILE_LIMIT, read_hmac_key_file
from uwsgi_fastrouter.signing import SigningError

SECRET = b"0123456789abcdef0123456789abcdef"


def key_file(tmp_path, content=SECRET + b"\n", mode=0o600, name="hmac.key"):
    path = tmp_path / name
    path.write_bytes(content)
    os.chmod(path, mode)
    return str(path)


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640, 0o660])
def test_owner_and_group_modes_are_accepted(tmp_path, mode):
    assert read_hmac_key_file(key_file(tmp_path, mode=mode)) == SECRET


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602, 0o601, 0o666])
def test_a_file_open_to_others_is_refused(tmp_path, mode):
    with pytest.raises(SigningError, match="open to other users \\(mode 0%o\\).*chmod 600" % mode):
        read_hmac_key_file(key_file(tmp_path, mode=mode))


def test_missing_empty_short_large_and_odd_files_are_refused(tmp_path):
    with pytest.raises(SigningError, match="cannot open the key file .*missing.key"):
        read_hmac_key_file(str(tmp_path / "missing.key"))
    with pytest.raises(SigningError, match="empty"):
        read_hmac_key_file(key_file(tmp_path, b"\n"))
    with pytest.raises(SigningError, match="at least 16"):
        read_hmac_key_file(key_file(tmp_path, b"tooshort"))
    with pytest.raises(SigningError, match="larger than"):
        read_hmac_key_file(key_file(tmp_path, b"x" * (KEY_FILE_LIMIT + 1)))
    os.mkfifo(str(tmp_path / "fifo"), 0o600)
    with pytest.raises(SigningError, match="not a regular file"):
        read_hmac_key_file(str(tmp_path / "fifo"))      # and the start does not hang
    with pytest.raises(SigningError, match="not a regular file"):
        read_hmac_key_file(str(tmp_path))


def test_a_symlink_is_followed_and_its_target_checked(tmp_path):
    target = key_file(tmp_path)
    os.symlink(target, str(tmp_path / "link"))
    assert read_hmac_key_file(str(tmp_path / "link")) == SECRET
    os.chmod(target, 0o644)
    with pytest.raises(SigningError, match="open to other users"):
        read_hmac_key_file(str(tmp_path / "link"))
