"""bfs_core.atomic: a writer failing half-way leaves no partial file, never replaces a good one, leaves no temp."""

import os
import stat

import pytest

from bfs_core.atomic import atomic_dir, atomic_open, atomic_path, atomic_write_bytes, atomic_write_text


GOOD = b"a good file the user already had\n"


class Crash(RuntimeError):
    pass


def listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def existing(tmp_path):
    path = tmp_path / "scene.psd"
    path.write_bytes(GOOD)
    return path


class TestAtomicPath:
    def test_success_replaces_and_leaves_no_temp(self, existing):
        with atomic_path(existing) as tmp:
            assert tmp.parent == existing.parent and tmp != existing
            assert tmp.suffix == ".psd"  # PIL picks the format from the extension
            tmp.write_bytes(b"new")
            assert existing.read_bytes() == GOOD  # nothing visible before the block ends
        assert existing.read_bytes() == b"new"
        assert listing(existing.parent) == ["scene.psd"]

    def test_failure_half_way_keeps_old_file_and_removes_temp(self, existing):
        with pytest.raises(Crash), atomic_path(existing) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half a PSD")
            raise Crash("disk full")
        assert existing.read_bytes() == GOOD
        assert listing(existing.parent) == ["scene.psd"]

    def test_failure_with_no_old_file_leaves_nothing(self, tmp_path):
        with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "new.png") as tmp:
            tmp.write_bytes(b"\x89PNG half")
            raise KeyboardInterrupt  # Ctrl-C / ComfyUI interrupt is a BaseException, not an Exception
        assert listing(tmp_path) == []

    def test_writer_that_removed_its_temp_itself(self, tmp_path):
        with pytest.raises(Crash), atomic_path(tmp_path / "x.bin") as tmp:
            tmp.unlink()
            raise Crash
        assert listing(tmp_path) == []

    def test_missing_folder_is_a_clear_error(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="does not exist"), atomic_path(tmp_path / "nope" / "x.psd"):
            pass

    def test_permissions_follow_umask_like_a_plain_open(self, tmp_path):
        plain = tmp_path / "plain.png"
        plain.write_bytes(b"x")
        with atomic_path(tmp_path / "atomic.png") as tmp:
            tmp.write_bytes(b"x")
        mode = stat.S_IMODE(os.stat(tmp_path / "atomic.png").st_mode)
        assert mode == stat.S_IMODE(os.stat(plain).st_mode), oct(mode)

    def test_keeps_an_existing_files_permissions(self, existing):
        os.chmod(existing, 0o640)
        atomic_write_bytes(existing, b"new")
        assert stat.S_IMODE(os.stat(existing).st_mode) == 0o640


class TestAtomicOpen:
    def test_text_is_utf8(self, tmp_path):
        atomic_write_text(tmp_path / "names.json", '["猫", "Ελληνικά", "🐈"]')
        assert (tmp_path / "names.json").read_bytes().decode("utf-8") == '["猫", "Ελληνικά", "🐈"]'

    def test_bytes(self, existing):
        atomic_write_bytes(existing, b"\x00\x01")
        assert existing.read_bytes() == b"\x00\x01"

    def test_failure_half_way_keeps_old_file(self, existing):
        with pytest.raises(Crash), atomic_open(existing, "wb") as f:
            f.write(b"partial")
            f.flush()
            raise Crash
        assert existing.read_bytes() == GOOD
        assert listing(existing.parent) == ["scene.psd"]

    def test_refuses_read_and_append_modes(self, existing):
        for mode in ("r", "a", "r+"):
            with pytest.raises(ValueError, match="must start with 'w'"), atomic_open(existing, mode):
                pass
        assert existing.read_bytes() == GOOD


class TestAtomicDir:
    def fill(self, folder, text):
        (folder / "config.json").write_text(text)
        (folder / "sub").mkdir()
        (folder / "sub" / "weights.safetensors").write_text(text)

    def test_success_replaces_old_folder_whole(self, tmp_path):
        target = tmp_path / "checkpoint"
        target.mkdir()
        self.fill(target, "old")
        (target / "stale.txt").write_text("from the old folder")
        with atomic_dir(target) as tmp:
            assert tmp != target and tmp.is_dir() and not any(tmp.iterdir())
            self.fill(tmp, "new")
        assert (target / "sub" / "weights.safetensors").read_text() == "new"
        assert not (target / "stale.txt").exists()
        assert listing(tmp_path) == ["checkpoint"]

    def test_failure_half_way_keeps_old_folder(self, tmp_path):
        target = tmp_path / "checkpoint"
        target.mkdir()
        self.fill(target, "old")
        with pytest.raises(Crash), atomic_dir(target) as tmp:
            (tmp / "config.json").write_text("half")
            raise Crash
        assert (target / "config.json").read_text() == "old"
        assert (target / "sub" / "weights.safetensors").read_text() == "old"
        assert listing(tmp_path) == ["checkpoint"]

    def test_leftover_from_a_killed_run_is_cleared(self, tmp_path):
        target = tmp_path / "out"
        leftover = tmp_path / "out.tmp"
        leftover.mkdir()
        (leftover / "junk").write_text("from a killed run")
        with atomic_dir(target) as tmp:
            assert not (tmp / "junk").exists()
            (tmp / "a").write_text("a")
        assert listing(target) == ["a"]
        assert listing(tmp_path) == ["out"]
