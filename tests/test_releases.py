"""Releases: archive member checks, Procfiles, retention, reuse and integrity.

The unit tests build archives in memory with tarfile and zipfile and unpack
them into a temp dir. The end-to-end tests deploy archives through the real
sandbox (systemd, Caddy, asset server), like test_slice.py, with the
operator running under Debian's python3.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import secrets
import stat
import struct
import tarfile
import zipfile

import pytest

import crate_operator as co
import harness
from test_slice import deploy, deploy_body, through_caddy

LIMITS = co.ArchiveLimits(max_members=20, max_bytes=1 << 20)
# Every malicious member aims at a path containing this name, so a test can
# prove that no such path exists anywhere after the archive was rejected.
TOKEN = "escaped-" + secrets.token_hex(4)
_ids = iter(range(500000, 600000))


def next_id() -> int:
    return next(_ids)


# === Archive builders ===

def tar_file(name, data=b"", mode=0o644):
    info = tarfile.TarInfo(name)
    info.mode = mode
    info.size = len(data)
    return info, data


def tar_dir(name, mode=0o755):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    return info, None


def tar_link(name, target, hard=False):
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    info.mode = 0o777
    return info, None


def tar_special(name, kind):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o644
    return info, None


def tar_bytes(members, compression="gz"):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}",
                      format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None
                            else None)
    return buffer.getvalue()


def zip_entry(name, data=b"", mode=0o100644, unix=True,
              compression=zipfile.ZIP_DEFLATED):
    info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
    info.compress_type = compression
    info.create_system = 3 if unix else 0
    info.external_attr = (mode << 16) if unix else 0
    return info, data


def zip_bytes(entries):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for info, data in entries:
            archive.writestr(info, data)
    return buffer.getvalue()


def patch_zip_sizes(data, uncompressed):
    """Rewrite the uncompressed size of the first member in both headers."""
    out = bytearray(data)
    local = out.find(b"PK\x03\x04")
    central = out.find(b"PK\x01\x02")
    out[local + 22:local + 26] = struct.pack("<I", uncompressed)
    out[central + 24:central + 28] = struct.pack("<I", uncompressed)
    return bytes(out)


def sample_source(build):
    """Return the sample app with its BUILD line set, as bytes."""
    with open(harness.SAMPLE_APP, "rb") as handle:
        source = handle.read()
    return source.replace(b'BUILD = "dev"\n',
                          b'BUILD = %s\n' % json.dumps(build).encode())


def app_archive(kind, build, extra=()):
    """Return an archive with the sample app as its single executable."""
    files = [("server", sample_source(build), 0o755),
             ("README.md", b"sample\n", 0o644),
             ("static/style.css", b"body {}\n", 0o644)]
    files += list(extra)
    if kind == "zip":
        return zip_bytes([zip_entry("static/", mode=0o040755)] +
                         [zip_entry(n, d, mode=0o100000 | m)
                          for n, d, m in files])
    members = [tar_dir("static")] + [tar_file(n, d, m) for n, d, m in files]
    return tar_bytes(members, "gz" if kind == "tar.gz" else "")


# === Unit: helpers ===

def unpack(tmp_path, data, limits=LIMITS):
    """Unpack ``data`` the way prepare() does; return the release dir."""
    asset = tmp_path / "asset"
    asset.write_bytes(data)
    dest = tmp_path / "release"
    dest.mkdir(mode=0o700)
    co.unpack_asset(str(asset), co.asset_kind(str(asset)), str(dest), limits)
    return dest


def escape_spots(directory):
    """Return the paths a member aimed at TOKEN could have reached."""
    spots = ["/tmp/" + TOKEN, "/" + TOKEN]
    path = os.path.abspath(directory)
    while path != "/":
        spots.append(os.path.join(path, TOKEN))
        path = os.path.dirname(path)
    return spots


def assert_nothing_outside(tmp_path):
    """Assert that unpacking wrote nothing beside the asset and the release."""
    assert sorted(os.listdir(tmp_path)) == ["asset", "release"]
    for spot in escape_spots(tmp_path / "release"):
        assert not os.path.lexists(spot), spot


# === Unit: malicious archives ===

DEEP = "a/" + "../" * 9 + TOKEN

TAR_CASES = {
    "dotdot": ([tar_file("../" + TOKEN, b"x")], "../" + TOKEN),
    "dotdot_deep": ([tar_dir("a"), tar_file(DEEP, b"x")], DEEP),
    "absolute_path": ([tar_file("/tmp/" + TOKEN, b"x")], "/tmp/" + TOKEN),
    "absolute_symlink": ([tar_link("etc", "/tmp"),
                          tar_file("etc/" + TOKEN, b"x")], "etc"),
    "symlink_out": ([tar_link("up", "../../.."),
                     tar_file("up/" + TOKEN, b"x")], "up"),
    "symlink_then_write": ([tar_dir("inner"), tar_link("inner/self", ".."),
                            tar_file("inner/self/" + TOKEN, b"x")],
                           "inner/self/" + TOKEN),
    "symlink_chain": ([tar_dir("a"), tar_link("a/b", ".."),
                       tar_link("c", "a/b/..")], "c"),
    "hardlink_absolute": ([tar_link("passwd", "/etc/passwd", hard=True)],
                          "passwd"),
    "hardlink_dotdot": ([tar_link("h", "../" + TOKEN, hard=True)], "h"),
    "hardlink_forward": ([tar_link("h", "later", hard=True),
                          tar_file("later", b"x")], "h"),
    "hardlink_to_symlink": ([tar_link("s", "README"),
                             tar_link("h", "s", hard=True)], "h"),
    "char_device": ([tar_special("tty", tarfile.CHRTYPE)], "tty"),
    "block_device": ([tar_special("sda", tarfile.BLKTYPE)], "sda"),
    "fifo": ([tar_special("pipe", tarfile.FIFOTYPE)], "pipe"),
    "setuid": ([tar_file("su", b"#!/bin/sh\n", 0o4755)], "su"),
    "setgid_dir": ([tar_dir("shared", 0o2775)], "shared"),
    "duplicate": ([tar_file("a", b"1"), tar_file("a", b"2")], "a"),
    "declared_too_big": ([tar_file("big", bytes(LIMITS.max_bytes + 1))],
                         "big"),
    "too_many_members": ([tar_file(f"f{n}", b"") for n in range(21)], "f20"),
}


@pytest.mark.parametrize("case", sorted(TAR_CASES))
def test_tar_member_rejected(tmp_path, case):
    members, culprit = TAR_CASES[case]
    with pytest.raises(co.ArchiveError) as caught:
        unpack(tmp_path, tar_bytes(members))
    assert caught.value.member == culprit
    assert repr(culprit) in str(caught.value)
    assert_nothing_outside(tmp_path)


def test_tar_plain_member_rejected(tmp_path):
    data = tar_bytes([tar_file("../" + TOKEN, b"x")], compression="")
    with pytest.raises(co.ArchiveError, match=TOKEN):
        unpack(tmp_path, data)
    assert_nothing_outside(tmp_path)


ZIP_CASES = {
    "dotdot": ([zip_entry("../" + TOKEN, b"x")], "../" + TOKEN),
    "absolute_path": ([zip_entry("/tmp/" + TOKEN, b"x")], "/tmp/" + TOKEN),
    "absolute_symlink": ([zip_entry("etc", b"/tmp", mode=0o120777),
                          zip_entry("etc/" + TOKEN, b"x")], "etc"),
    "symlink_out": ([zip_entry("up", b"../..", mode=0o120777)], "up"),
    "symlink_then_write": ([zip_entry("d/", mode=0o040755),
                            zip_entry("link", b"d", mode=0o120777),
                            zip_entry("link/" + TOKEN, b"x")],
                           "link/" + TOKEN),
    "char_device": ([zip_entry("tty", mode=0o020644)], "tty"),
    "fifo": ([zip_entry("pipe", mode=0o010644)], "pipe"),
    "setuid": ([zip_entry("su", b"#!/bin/sh\n", mode=0o104755)], "su"),
    "declared_too_big": ([zip_entry("big", bytes(LIMITS.max_bytes + 1),
                                    compression=zipfile.ZIP_STORED)], "big"),
    "too_many_members": ([zip_entry(f"f{n}") for n in range(21)], "f20"),
}


@pytest.mark.parametrize("case", sorted(ZIP_CASES))
def test_zip_member_rejected(tmp_path, case):
    entries, culprit = ZIP_CASES[case]
    with pytest.raises(co.ArchiveError) as caught:
        unpack(tmp_path, zip_bytes(entries))
    assert caught.value.member == culprit
    assert repr(culprit) in str(caught.value)
    assert_nothing_outside(tmp_path)


def test_zip_bomb_ratio_rejected_before_writing(tmp_path):
    limits = co.ArchiveLimits(max_members=20, max_bytes=64 << 20)
    data = zip_bytes([zip_entry("small", b"fine"),
                      zip_entry("bomb", bytes(16 << 20))])
    with pytest.raises(co.ArchiveError, match="expands") as caught:
        unpack(tmp_path, data, limits)
    assert caught.value.member == "bomb"
    assert os.listdir(tmp_path / "release") == []
    assert_nothing_outside(tmp_path)


def test_zip_huge_declared_size_rejected(tmp_path):
    data = patch_zip_sizes(zip_bytes([zip_entry("huge", b"x" * 100)]),
                           0xFFFFFFF0)
    with pytest.raises(co.ArchiveError, match="declares 4294967280") as caught:
        unpack(tmp_path, data)
    assert caught.value.member == "huge"
    assert_nothing_outside(tmp_path)


def test_zip_size_lie_rejected(tmp_path):
    # The headers claim 10 bytes, the data contains 5000: reading stops at the
    # declared size and the CRC check fails.
    data = patch_zip_sizes(zip_bytes([zip_entry("liar", b"y" * 5000)]), 10)
    with pytest.raises(co.ArchiveError) as caught:
        unpack(tmp_path, data)
    assert caught.value.member == "liar"
    assert_nothing_outside(tmp_path)


def test_zip_encrypted_member_rejected(tmp_path):
    info, payload = zip_entry("secret", b"x", compression=zipfile.ZIP_STORED)
    data = bytearray(zip_bytes([(info, payload)]))
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(signature) + offset
        flags = struct.unpack("<H", data[at:at + 2])[0] | 0x1
        data[at:at + 2] = struct.pack("<H", flags)
    with pytest.raises(co.ArchiveError, match="encrypted") as caught:
        unpack(tmp_path, bytes(data))
    assert caught.value.member == "secret"


def test_zip_central_directory_too_large(tmp_path):
    limits = co.ArchiveLimits(max_members=2, max_bytes=1 << 20)
    data = zip_bytes([zip_entry("n" * 700 + str(n)) for n in range(2)])
    with pytest.raises(co.ArchiveError, match="central directory"):
        unpack(tmp_path, data, limits)
    assert os.listdir(tmp_path / "release") == []


def test_zip64_directory_size_read(tmp_path):
    # 65536 members need the Zip64 end record. Python writes the true size
    # into the classic record too, so saturate it the way other tools do.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for n in range(0x10000):
            archive.writestr(str(n), b"")
    data = bytearray(buffer.getvalue())
    end = data.rfind(b"PK\x05\x06")
    true_size = struct.unpack("<I", data[end + 12:end + 16])[0]
    data[end + 12:end + 16] = b"\xff\xff\xff\xff"
    path = tmp_path / "big.zip"
    path.write_bytes(bytes(data))
    assert co._zip_directory_size(str(path)) == true_size
    with pytest.raises(co.ArchiveError, match="central directory"):
        co.extract_zip(str(path), str(tmp_path), LIMITS)


def test_writer_counts_bytes_actually_written(tmp_path):
    # Declared sizes can lie, so the copy itself stops at the limit.
    limits = co.ArchiveLimits(max_members=5, max_bytes=1000)
    writer = co._ReleaseWriter(str(tmp_path), limits)
    try:
        writer.count("liar", 10)
        with pytest.raises(co.ArchiveError, match="max_unpacked_bytes") as caught:
            writer.add_file("liar", ("liar",), io.BytesIO(b"z" * 5000), False)
    finally:
        writer.close()
    assert caught.value.member == "liar"


def test_gzip_stream_limit_bounds_headers(tmp_path):
    # A pax header is read into memory before any size check can run; the
    # stream limit stops a huge one.
    info = tarfile.TarInfo("x")
    info.pax_headers = {"comment": "c" * (3 << 20)}
    data = tar_bytes([(info, b"")])
    limits = co.ArchiveLimits(max_members=1, max_bytes=1)
    with pytest.raises(co.ArchiveError, match="tar stream is longer"):
        unpack(tmp_path, data, limits)


def test_truncated_gzip_names_member(tmp_path):
    data = tar_bytes([tar_file("a", os.urandom(100000))])
    with pytest.raises(co.ArchiveError, match="could not be unpacked") as caught:
        unpack(tmp_path, data[:len(data) // 2])
    assert caught.value.member == "a"


# === Unit: good archives ===

@pytest.mark.parametrize("kind", ["tar.gz", "tar", "zip"])
def test_archive_unpacks_read_only(tmp_path, kind):
    dest = unpack(tmp_path, app_archive(kind, "u1"))
    co.seal_tree(str(dest))
    modes = {path: stat.S_IMODE(os.lstat(dest / path).st_mode)
             for path in ("", "server", "README.md", "static",
                          "static/style.css")}
    assert modes == {"": 0o555, "server": 0o555, "README.md": 0o444,
                     "static": 0o555, "static/style.css": 0o444}
    assert (dest / "server").read_bytes() == sample_source("u1")
    assert co.release_command(str(dest)) == [str(dest / "server")]


def test_tar_links_inside_kept(tmp_path):
    data = tar_bytes([tar_dir("bin"), tar_file("bin/run", b"#!/bin/sh\n", 0o755),
                      tar_link("run", "bin/run"),
                      tar_link("bin/again", "bin/run", hard=True),
                      tar_link("bin/up", "../bin")])
    dest = unpack(tmp_path, data)
    assert os.readlink(dest / "run") == "bin/run"
    assert os.stat(dest / "bin/again").st_ino == os.stat(dest / "bin/run").st_ino
    assert os.readlink(dest / "bin/up") == "../bin"


def test_zip_without_unix_modes_detects_scripts(tmp_path):
    data = zip_bytes([zip_entry("run", b"#!/bin/sh\necho\n", unix=False),
                      zip_entry("notes.txt", b"text", unix=False)])
    dest = unpack(tmp_path, data)
    co.seal_tree(str(dest))
    assert stat.S_IMODE(os.stat(dest / "run").st_mode) == 0o555
    assert stat.S_IMODE(os.stat(dest / "notes.txt").st_mode) == 0o444


def test_raw_executable_becomes_app(tmp_path):
    dest = unpack(tmp_path, b"#!/bin/sh\nexit 0\n")
    assert os.listdir(dest) == ["app"]
    assert co.release_command(str(dest)) == [str(dest / "app")]


@pytest.mark.parametrize("head,kind", [
    (b"\x7fELF\x02\x01", "executable"), (b"#!/bin/sh\n", "executable"),
    (tar_bytes([tar_file("a")]), "tar.gz"),
    (tar_bytes([tar_file("a")], compression=""), "tar"),
    (zip_bytes([zip_entry("a")]), "zip"), (zip_bytes([]), "zip"),
])
def test_asset_kind_from_content(tmp_path, head, kind):
    path = tmp_path / "asset.bin"
    path.write_bytes(head)
    assert co.asset_kind(str(path)) == kind


@pytest.mark.parametrize("head,word", [
    (b"BZh91AY&SY", "bzip2"), (b"\xfd7zXZ\x00\x00", "xz"),
    (b"hello world", "neither"),
])
def test_asset_kind_rejects_other_content(tmp_path, head, word):
    path = tmp_path / "app.tar.gz"
    path.write_bytes(head)
    with pytest.raises(co.StepError, match=word):
        co.asset_kind(str(path))


# === Unit: what to run ===

def make_release(tmp_path, files):
    root = tmp_path / "rel"
    root.mkdir()
    for name, (data, mode) in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
    return root


def test_procfile_web_line_used(tmp_path):
    root = make_release(tmp_path, {
        "Procfile": (b"# processes\nworker: ./bin/work\n"
                     b"web: ./bin/server --port $PORT --name 'a b'\n", 0o644),
        "bin/server": (b"#!/bin/sh\n", 0o755),
        "other": (b"#!/bin/sh\n", 0o755)})
    argv = co.release_command(str(root))
    assert argv == [str(root / "bin/server"), "--port", co.PORT_MARK,
                    "--name", "a b"]


@pytest.mark.parametrize("command,words", [
    ("./s --port=${PORT}", ["--port=" + co.PORT_MARK]),
    ('./s "$PORT"', [co.PORT_MARK]),
    ("./s '$PORT'", ["$PORT"]),
    ('./s "\\$HOME"', ["$HOME"]),
    ("./s \\$HOME", ["$HOME"]),
    ("./s 'a|b' \"c;d\" e\\&f", ["a|b", "c;d", "e&f"]),
    ("./s a#b # a comment", ["a#b"]),
])
def test_procfile_words(command, words):
    assert co.procfile_web_command(f"web: {command}\n")[1:] == words


@pytest.mark.parametrize("command,operator", [
    ("./s | tee log", "'|'"), ("./s && ./t", "'&&'"), ("./s || ./t", "'||'"),
    ("./s; ./t", "';'"), ("./s > log", "'>'"), ("./s < in", "'<'"),
    ("./s &", "'&'"), ("./s `id`", "'`'"), ("./s $(id)", "'$('"),
    ('./s "$(id)"', "'$('"), ("./s $HOME", "$PORT"), ("(./s)", "'('"),
])
def test_procfile_shell_syntax_rejected(command, operator):
    text = f"# comment\n\nweb: {command}\n"
    with pytest.raises(co.StepError) as caught:
        co.procfile_web_command(text)
    assert "Procfile line 3" in str(caught.value)
    assert operator in str(caught.value)


@pytest.mark.parametrize("text,message", [
    ("worker: ./w\n", "no web: line"),
    ("web: ./a\nweb: ./b\n", "more than one web: line"),
    ("web:   \n", "empty web command"),
    ("web: $PORT\n", "cannot be $PORT"),
    ("web: ./s 'open\n", "cannot be split"),
])
def test_procfile_invalid(text, message):
    with pytest.raises(co.StepError, match=message.replace("$", r"\$")):
        co.procfile_web_command(text)


@pytest.mark.parametrize("program,message", [
    ("../outside", "points outside"),
    ("./missing", "not an executable file"),
    ("./data.txt", "not an executable file"),
    ("./link_out", "points outside"),
    ("no-such-program-here", "was not found"),
])
def test_procfile_program_checked(tmp_path, program, message):
    root = make_release(tmp_path, {
        "Procfile": (f"web: {program}\n".encode(), 0o644),
        "data.txt": (b"x", 0o644)})
    (tmp_path / "outside").write_bytes(b"#!/bin/sh\n")
    (tmp_path / "outside").chmod(0o755)
    os.symlink("../outside", root / "link_out")
    with pytest.raises(co.StepError, match=message):
        co.release_command(str(root))


def test_procfile_host_program_allowed(tmp_path):
    root = make_release(tmp_path, {"Procfile": (b"web: sh -c true\n", 0o644)})
    argv = co.release_command(str(root))
    assert argv[0] in ("/usr/bin/sh", "/bin/sh")
    assert argv[1:] == ["-c", "true"]


@pytest.mark.parametrize("files,listing", [
    ({"README": (b"x", 0o644), "lib/a": (b"x", 0o755)},
     "no executable file"),
    ({"one": (b"x", 0o755), "two": (b"x", 0o755)}, "2 executable files"),
])
def test_no_procfile_ambiguous_fails(tmp_path, files, listing):
    root = make_release(tmp_path, files)
    with pytest.raises(co.StepError) as caught:
        co.release_command(str(root))
    assert listing in str(caught.value)
    for name in files:
        assert name.split("/")[0] in str(caught.value)


def runtime_for(tmp_path, **overrides):
    config = co.load_config(None, {}, dict(
        {"token": "t" * 32, "callback_secret": "s" * 32,
         "apps_dir": str(tmp_path / "apps"),
         "state_dir": str(tmp_path / "state"),
         "unit_dir": str(tmp_path / "units")}, **overrides))
    os.makedirs(config.unit_dir)
    store = co.Store(config.state_dir)
    systemd = co.Systemd(["/bin/false"], config.unit_dir)
    return co.BinaryRuntime(config, systemd, store), store


def test_install_puts_port_into_exec_start(tmp_path):
    runtime, _ = runtime_for(tmp_path)
    release = {"release": str(tmp_path / "apps/1/releases/v1-1"),
               "argv": [str(tmp_path / "apps/1/releases/v1-1/bin/s"),
                        "--port", co.PORT_MARK, "--url=http://x:" + co.PORT_MARK,
                        "$HOME", "100%"]}
    plan = {"app_id": 1, "version": "v1", "deployment_id": "1",
            "env_vars": {}}
    instance = {"instance_id": "blue", "name": "blue", "port": 8123,
                "unit": co.unit_name(1, "blue")}
    runtime.install(plan, instance, release)
    unit = (tmp_path / "units" / instance["unit"]).read_text()
    line = [ln for ln in unit.splitlines() if ln.startswith("ExecStart=")][0]
    assert '"--port" "8123" "--url=http://x:8123" "$$HOME" "100%%"' in line
    assert "\x00" not in unit


# === Unit: retention ===

def test_prune_keeps_newest_and_in_use(tmp_path):
    runtime, store = runtime_for(tmp_path, release_retention=2)
    releases = runtime.releases_dir(7)
    os.makedirs(releases)
    for n in range(1, 6):
        os.mkdir(os.path.join(releases, f"v{n}-{n}"), 0o555)
        runtime._write_record(7, {"name": f"v{n}-{n}", "version": f"v{n}",
                                  "used_at": 1000.0 + n})
    os.mkdir(os.path.join(releases, ".staging-left"))
    store.save_app({"app_id": 7, "instances": {
        "blue": {"release": os.path.join(releases, "v1-1")}}})
    runtime.prune_releases(7, "v3-3")
    assert sorted(os.listdir(releases)) == [".meta", "v1-1", "v3-3", "v4-4",
                                            "v5-5"]
    records = sorted(r["name"] for r in runtime.release_records(7))
    assert records == ["v1-1", "v3-3", "v4-4", "v5-5"]


def test_lost_release_record_means_no_reuse(tmp_path, monkeypatch):
    """A release record is written without fsync. A record that a power
    loss left empty is skipped, and its release is pruned by age."""
    runtime, _ = runtime_for(tmp_path, release_retention=1)
    synced = []
    monkeypatch.setattr(co, "sync_fd", lambda fd, data_only=False:
                        synced.append(fd))
    releases = runtime.releases_dir(7)
    os.makedirs(releases)
    for n in (1, 2):
        os.mkdir(os.path.join(releases, f"v{n}-{n}"), 0o555)
        runtime._write_record(7, {"name": f"v{n}-{n}", "version": f"v{n}",
                                  "used_at": 1000.0 + n})
    assert synced == []
    with open(runtime._record_path(7, "v2-2"), "w", encoding="utf-8"):
        pass
    assert [r["name"] for r in runtime.release_records(7)] == ["v1-1"]
    os.utime(os.path.join(releases, "v2-2"), (1.0, 1.0))
    runtime.prune_releases(7, "v1-1")
    assert sorted(os.listdir(releases)) == [".meta", "v1-1"]


# === Unit: downloads ===

def test_download_4xx_not_retried(asset_server, tmp_path):
    asset_server.put("dl/forbidden", b"data")
    asset_server.set_fault("/dl/forbidden", status=403)
    with pytest.raises(co.FetchError, match="HTTP 403"):
        co.download(asset_server.url("/dl/forbidden"), str(tmp_path / "a"),
                    1 << 20, 10, {})
    assert asset_server.count("/dl/forbidden") == 1


def test_download_refused_connection_retried(tmp_path, caplog):
    url = f"http://127.0.0.1:{harness.free_port()}/asset"
    with caplog.at_level(logging.WARNING, logger="crate_operator"):
        with pytest.raises(co.FetchError, match="after 3 attempts"):
            co.download(url, str(tmp_path / "a"), 1 << 20, 10, {})
    retries = [r for r in caplog.records
               if r.getMessage() == "asset.download_retry"]
    assert len(retries) == co.DOWNLOAD_ATTEMPTS


@pytest.mark.parametrize("fault", [{"status": 503}, {"cut_after": 10}])
def test_download_transient_failure_retried(asset_server, tmp_path, fault):
    name = f"dl/flaky-{next_id()}"
    asset_server.put(name, b"x" * 1000)
    asset_server.set_fault("/" + name, **fault)
    with pytest.raises(co.FetchError, match="after 3 attempts"):
        co.download(asset_server.url("/" + name), str(tmp_path / "a"),
                    1 << 20, 10, {})
    assert asset_server.count("/" + name) == co.DOWNLOAD_ATTEMPTS


def test_download_logs_progress(asset_server, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(co, "DOWNLOAD_PROGRESS_BYTES", 64 << 10)
    data = os.urandom(300 << 10)
    url = asset_server.put("dl/large", data)
    with caplog.at_level(logging.INFO, logger="crate_operator"):
        digest = co.download(url, str(tmp_path / "a"), 1 << 20, 10,
                             {"app_id": 5})
    assert digest == hashlib.sha256(data).hexdigest()
    progress = [r.fields for r in caplog.records
                if r.getMessage() == "asset.download_progress"]
    assert [p["percent"] for p in progress] == [21, 43, 64, 85]
    assert all(p["app_id"] == 5 for p in progress)
    done = [r.fields for r in caplog.records
            if r.getMessage() == "asset.downloaded"]
    assert done[0]["bytes"] == len(data)


# === End to end ===

def publish(asset_server, data):
    """Serve ``data`` under a new name; return its URL."""
    return asset_server.put(f"releases/{next_id()}", data)


def url_path(url):
    """Return the path of an asset URL, as AssetServer.count() expects it."""
    return "/" + url.split("/", 3)[3]


def releases_of(shared_dir, app_id):
    path = os.path.join(shared_dir, "apps", str(app_id), "releases")
    return sorted(n for n in os.listdir(path) if not n.startswith("."))


def release_dir(shared_dir, body):
    return os.path.join(shared_dir, "apps", str(body["app_id"]), "releases",
                        f"{body['target_version']}-{body['deployment_id']}")


@pytest.mark.parametrize("kind", ["tar.gz", "tar", "zip"])
def test_archive_kinds_serve(operator, caddy, asset_server, callbacks,
                             shared_dir, kind):
    url = publish(asset_server, app_archive(kind, f"arch-{kind}"))
    body = deploy_body(next_id(), next_id(), url, callbacks)
    doc = deploy(operator, body)
    assert doc["state"] == "succeeded", doc
    status, text = through_caddy(caddy, body["domain"])
    assert status == 200
    assert text.startswith(f"arch-{kind} ")
    release = release_dir(shared_dir, body)
    assert stat.S_IMODE(os.stat(release).st_mode) == 0o555
    assert stat.S_IMODE(os.stat(os.path.join(release, "static")).st_mode) \
        == 0o555
    assert stat.S_IMODE(os.stat(os.path.join(release, "README.md")).st_mode) \
        == 0o444


def test_procfile_app_gets_port_argument(operator, caddy, asset_server,
                                         callbacks, shared_dir):
    data = tar_bytes([
        tar_file("Procfile", b"web: ./bin/server --port $PORT --mode 'a b'\n"),
        tar_dir("bin"), tar_file("bin/server", sample_source("proc"), 0o755),
        tar_file("tool", b"#!/bin/sh\n", 0o755)])
    body = deploy_body(next_id(), next_id(), publish(asset_server, data),
                       callbacks)
    doc = deploy(operator, body)
    assert doc["state"] == "succeeded", doc
    assert through_caddy(caddy, body["domain"])[1].startswith("proc ")
    port = str(body["slots"]["blue"]["port"])
    argv = json.loads(through_caddy(caddy, body["domain"], "/argv")[1])
    assert argv == ["--port", port, "--mode", "a b"]
    unit = os.path.join(shared_dir, "units",
                        f"crate-app-{body['app_id']}-blue.service")
    with open(unit, encoding="utf-8") as handle:
        exec_start = [ln for ln in handle if ln.startswith("ExecStart=")][0]
    server = os.path.join(release_dir(shared_dir, body), "bin", "server")
    assert exec_start == (f'ExecStart="{server}" "--port" "{port}" '
                          f'"--mode" "a b"\n')


def test_procfile_shell_operator_fails(operator, asset_server, callbacks,
                                       shared_dir):
    data = tar_bytes([tar_file("Procfile", b"web: ./server | tee log\n"),
                      tar_file("server", sample_source("x"), 0o755)])
    body = deploy_body(next_id(), next_id(), publish(asset_server, data),
                       callbacks)
    doc = deploy(operator, body)
    assert doc["state"] == "failed"
    assert "Procfile line 1" in doc["error"]
    assert "'|'" in doc["error"]
    assert releases_of(shared_dir, body["app_id"]) == []


def test_no_executable_fails_with_listing(operator, asset_server, callbacks):
    data = zip_bytes([zip_entry("lib/", mode=0o040755),
                      zip_entry("README.md", b"x")])
    body = deploy_body(next_id(), next_id(), publish(asset_server, data),
                       callbacks)
    doc = deploy(operator, body)
    assert doc["state"] == "failed"
    assert "README.md, lib/" in doc["error"]
    assert "Procfile" in doc["error"]


@pytest.fixture(scope="module")
def victim(operator, asset_server, callbacks):
    """An app serving build "good" that the malicious archives try to replace."""
    url = publish(asset_server, app_archive("tar.gz", "good"))
    body = deploy_body(next_id(), next_id(), url, callbacks)
    doc = deploy(operator, body)
    assert doc["state"] == "succeeded", doc
    return body


MALICIOUS = {
    "dotdot": (lambda: tar_bytes([tar_file("../../" + TOKEN, b"x")]),
               "../../" + TOKEN),
    "deep_dotdot": (lambda: tar_bytes([tar_dir("a"), tar_file(DEEP, b"x")]),
                    DEEP),
    "absolute_path": (lambda: tar_bytes([tar_file("/tmp/" + TOKEN, b"x")]),
                      "/tmp/" + TOKEN),
    "absolute_symlink": (lambda: tar_bytes([tar_link("t", "/tmp"),
                                            tar_file("t/" + TOKEN, b"x")]),
                         "t"),
    "symlink_then_write": (lambda: tar_bytes([
        tar_dir("d"), tar_link("d/self", ".."),
        tar_file("d/self/" + TOKEN, b"x")]), "d/self/" + TOKEN),
    "symlink_chain": (lambda: tar_bytes([tar_dir("a"), tar_link("a/b", ".."),
                                         tar_link("c", "a/b/..")]), "c"),
    "hardlink_out": (lambda: tar_bytes([
        tar_link("passwd", "/etc/passwd", hard=True)]), "passwd"),
    "device": (lambda: tar_bytes([tar_special("null", tarfile.CHRTYPE)]),
               "null"),
    "fifo": (lambda: tar_bytes([tar_special("pipe", tarfile.FIFOTYPE)]),
             "pipe"),
    "setuid": (lambda: tar_bytes([tar_file("su", sample_source("su"),
                                           0o4755)]), "su"),
    "zip_dotdot": (lambda: zip_bytes([zip_entry("../" + TOKEN, b"x")]),
                   "../" + TOKEN),
    "zip_symlink_out": (lambda: zip_bytes([
        zip_entry("up", b"../../..", mode=0o120777)]), "up"),
    "zip_bomb": (lambda: zip_bytes([zip_entry("bomb", bytes(32 << 20))]),
                 "bomb"),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_archive_rejected_f14(operator, caddy, asset_server,
                                        callbacks, shared_dir, victim, case):
    build, culprit = MALICIOUS[case]
    before = releases_of(shared_dir, victim["app_id"])
    body = dict(victim, deployment_id=next_id(),
                asset_url=publish(asset_server, build()),
                target_version=f"bad-{case}")
    doc = deploy(operator, body)
    assert doc["state"] == "failed", doc
    assert repr(culprit) in doc["error"]
    assert doc["serving_version"] == victim["target_version"]
    assert through_caddy(caddy, victim["domain"])[1].startswith("good ")
    releases = os.path.join(shared_dir, "apps", str(victim["app_id"]),
                            "releases")
    assert releases_of(shared_dir, victim["app_id"]) == before
    assert [n for n in os.listdir(releases) if n.startswith(".staging")] == []
    for spot in escape_spots(os.path.join(releases, ".staging-x", "tree")):
        assert not os.path.lexists(spot), spot


def test_archive_limits_end_to_end(operator_factory, caddy, asset_server,
                                   callbacks, shared_dir):
    op = operator_factory({"max_archive_members": 8,
                           "max_unpacked_bytes": 1 << 20})
    first = deploy_body(next_id(), next_id(),
                        publish(asset_server, app_archive("zip", "lim")),
                        callbacks)
    assert deploy(op, first)["state"] == "succeeded"
    cases = [
        (tar_bytes([tar_file(f"f{n}") for n in range(9)]), "f8"),
        (tar_bytes([tar_file("huge", bytes(2 << 20))]), "huge"),
        (patch_zip_sizes(zip_bytes([zip_entry("liar", b"x" * 100)]),
                         0xFFFFFFF0), "liar"),
    ]
    for data, culprit in cases:
        body = dict(first, deployment_id=next_id(),
                    asset_url=publish(asset_server, data))
        doc = deploy(op, body)
        assert doc["state"] == "failed", doc
        assert repr(culprit) in doc["error"]
        assert through_caddy(caddy, first["domain"])[1].startswith("lim ")
    assert releases_of(shared_dir, first["app_id"]) == [
        f"{first['target_version']}-{first['deployment_id']}"]


def test_pruning_keeps_newest_releases(operator, asset_server, callbacks,
                                       shared_dir):
    app_id = next_id()
    first = deploy_body(app_id, next_id(), "http://unused.test/", callbacks)
    names = []
    for n in range(5):
        body = dict(first, deployment_id=next_id(), target_version=f"p{n}",
                    asset_url=publish(asset_server,
                                      app_archive("tar.gz", f"p{n}")))
        assert deploy(operator, body)["state"] == "succeeded"
        names.append(f"p{n}-{body['deployment_id']}")
    assert releases_of(shared_dir, app_id) == sorted(names[2:])
    assert f"release.pruned release={names[1]} app_id={app_id}" in \
        operator.log_text()


def test_pruning_never_removes_serving_or_previous(operator_factory,
                                                   asset_server, callbacks,
                                                   shared_dir, caddy):
    op = operator_factory({"release_retention": 1})
    app_id = next_id()
    first = deploy_body(app_id, next_id(), "http://unused.test/", callbacks)
    names = []
    for n in range(3):
        body = dict(first, deployment_id=next_id(), target_version=f"r{n}",
                    asset_url=publish(asset_server,
                                      app_archive("tar", f"r{n}")))
        assert deploy(op, body)["state"] == "succeeded"
        names.append(f"r{n}-{body['deployment_id']}")
    # retention 1 keeps only the newest, but the previous release stays
    # because the instance pointed at it when r2 was prepared.
    assert releases_of(shared_dir, app_id) == sorted(names[1:])
    assert through_caddy(caddy, first["domain"])[1].startswith("r2 ")


def test_redeploy_reuses_retained_release(operator, caddy, asset_server,
                                          callbacks, shared_dir):
    app_id = next_id()
    url_one = publish(asset_server, app_archive("tar.gz", "one"))
    url_two = publish(asset_server, app_archive("tar.gz", "two"))
    one = deploy_body(app_id, next_id(), url_one, callbacks,
                      target_version="one")
    assert deploy(operator, one)["state"] == "succeeded"
    two = dict(one, deployment_id=next_id(), asset_url=url_two,
               target_version="two", deployment_strategy="bluegreen")
    assert deploy(operator, two)["state"] == "succeeded"
    again = dict(one, deployment_id=next_id(), deployment_strategy="bluegreen")
    doc = deploy(operator, again)
    assert doc["state"] == "succeeded", doc
    assert asset_server.count(url_path(url_one)) == 1
    assert through_caddy(caddy, one["domain"])[1].startswith("one ")
    assert releases_of(shared_dir, app_id) == sorted(
        [f"one-{one['deployment_id']}", f"two-{two['deployment_id']}"])
    assert (f"release.reused release=one-{one['deployment_id']} version=one "
            f"app_id={app_id} deployment_id={again['deployment_id']}") in \
        operator.log_text()


def test_sha256_match_and_mismatch(operator, caddy, asset_server, callbacks,
                                   shared_dir):
    data = app_archive("zip", "sha")
    url = publish(asset_server, data)
    digest = hashlib.sha256(data).hexdigest()
    body = deploy_body(next_id(), next_id(), url, callbacks,
                       asset_sha256=digest)
    assert deploy(operator, body)["state"] == "succeeded"
    wrong = "0" * 64
    bad = dict(body, deployment_id=next_id(), asset_sha256=wrong,
               deployment_strategy="bluegreen")
    doc = deploy(operator, bad)
    assert doc["state"] == "failed"
    assert f"asset sha256 is {digest}, but asset_sha256 expects {wrong}" in \
        doc["error"]
    assert doc["serving_version"] == body["target_version"]
    assert through_caddy(caddy, body["domain"])[1].startswith("sha ")
    assert releases_of(shared_dir, body["app_id"]) == [
        os.path.basename(release_dir(shared_dir, body))]
    # The retained release was not reused for the other digest: the asset
    # was downloaded again and checked.
    assert asset_server.count(url_path(url)) == 2
