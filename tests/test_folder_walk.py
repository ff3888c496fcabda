"""Image-folder walks (training, massl-eval, massl-shard): only regular files, no link loops, no
linked folder entered (no class invented, no other tree pulled in); a link to a file is that file."""
import logging
import os

from massl.data.files import scan_image_folder


def touch(path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"x")
    return path


def test_links_and_special_files_are_skipped_with_one_warning_each(tmp_path, caplog):
    root, outside = tmp_path / "root", tmp_path / "outside"
    a1, a2, b1 = (touch(str(root / p)) for p in ("a/1.jpg", "a/2.jpg", "b/1.jpg"))
    secret = touch(str(outside / "secret.jpg"))
    os.symlink(str(root), str(root / "bogus"))  # a class that is the whole folder again (and a loop)
    os.symlink(str(root), str(root / "a" / "loop"))  # a loop inside a class
    os.symlink(str(outside), str(root / "b" / "out"))  # a folder outside
    os.symlink(secret, str(root / "b" / "secret.jpg"))  # a link to a file: that file, an explicit choice
    os.symlink(a1, str(root / "b" / "alias.jpg"))
    os.mkfifo(str(root / "a" / "3.jpg"))  # a reader opening it would block forever
    with caplog.at_level(logging.WARNING, logger="massl"):
        paths, labels, classes = scan_image_folder(str(root))
    assert classes == ["a", "b"]  # before: a class 'bogus' holding every image again
    b = [str(root / "b" / n) for n in ("1.jpg", "alias.jpg", "secret.jpg")]
    assert paths == [a1, a2] + b and b1 in paths  # before: the FIFO too, and a whole tree through b/out
    assert labels == [0, 0, 1, 1, 1]
    warned = [r.getMessage() for r in caplog.records]
    assert any("skipped 3 linked folders" in w for w in warned), warned
    assert any("skipped 1 entries that are not regular files" in w and "3.jpg" in w for w in warned), warned
