#!/usr/bin/env python3
"""seekdir.py DIR: list DIR with opendir/readdir, then rewind, note
telldir every 97 entries, and seekdir back to each mark (last first):
what follows must be what followed the first time. Exit 0 when it all
matches; prints 'N entries, M seekdir positions, K differ'."""
import ctypes, ctypes.util, sys


class Dirent(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                ("d_reclen", ctypes.c_ushort), ("d_type", ctypes.c_ubyte),
                ("d_name", ctypes.c_char * 256)]


libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
libc.opendir.restype = ctypes.c_void_p
libc.readdir.argtypes = [ctypes.c_void_p]
libc.readdir.restype = ctypes.POINTER(Dirent)
libc.telldir.argtypes = [ctypes.c_void_p]
libc.telldir.restype = ctypes.c_long
libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
libc.rewinddir.argtypes = [ctypes.c_void_p]
libc.closedir.argtypes = [ctypes.c_void_p]


def rest(d):
    out = []
    while True:
        e = libc.readdir(d)
        if not e:
            return out
        out.append(e.contents.d_name)


d = libc.opendir(sys.argv[1].encode())
if not d:
    sys.exit(f"opendir {sys.argv[1]}: errno {ctypes.get_errno()}")
everything = rest(d)
libc.rewinddir(d)
marks = []
for i, name in enumerate(everything):
    if i % 97 == 0:
        marks.append((i, libc.telldir(d)))
    e = libc.readdir(d)
    if not e or e.contents.d_name != name:
        sys.exit(f"entry {i} differs after rewinddir")
bad = 0
for i, pos in reversed(marks):
    libc.seekdir(d, pos)
    if rest(d) != everything[i:]:
        bad += 1
        print(f"seekdir to entry {i} (position {pos}) lists differently")
libc.closedir(d)
print(f"{len(everything)} entries, {len(marks)} seekdir positions, {bad} differ")
sys.exit(1 if bad else 0)
