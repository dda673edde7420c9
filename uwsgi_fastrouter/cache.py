"""Named key/value caches shared by every router process, and the cache mapper.

Theory of operation
-------------------
A :class:`Cache` follows uWSGI's cache semantics: a fixed number of items,
each with a key of at most *keysize* bytes and a value of at most *blocksize*
bytes.  ``set`` refuses a key that exists, an empty or oversized value, an
empty or oversized key, and any insert into a full cache (uWSGI evicts
nothing: it logs ``*** DANGER cache "NAME" is FULL !!! ***``).  Like uWSGI, a
cache created for N items holds N - 1 of them (its item 0 is reserved).

Sharing.  All state lives in one anonymous shared mapping
(``mmap.mmap(-1, size)``, which is ``MAP_SHARED``), created when the cache is
created.  Processes forked afterwards see the same pages, so a change made by
any of them is seen by all.  (A process started with ``exec`` does not inherit
it: the caches belong to one process tree.)  Nothing in the mapping is a
pointer; every reference is an item number, and the hash is ``zlib.crc32`` of
the key, the same in every process.

Locking.  One lock per cache, taken for every operation (reads too: a read
counts a hit).  Across processes it is a POSIX record lock (``fcntl.lockf``)
on an unlinked temporary file opened when the cache is created.  ``flock``
would not do: its locks belong to the open file description, which a fork
shares, so parent and child would both "hold" it.  POSIX record locks belong
to the process, so they exclude each other across fork but not among threads
of one process; a ``threading.Lock`` taken first covers threads (scripts may
start some).  A forked child gets a fresh thread lock (one copied while another
thread held it would stay locked forever).  Nothing else needs care at fork:
the mapping is shared, not copied, so a write in progress in the parent simply
completes, and the child's record lock waits for it.

Layout of the mapping (native byte order, all sizes fixed at creation)::

    control block    16 bytes   count, high, free_head (u32 each) + padding
    index            index_size x u32
    slots            capacity x slot_size

*index* is an open-addressing table (linear probing, power-of-two size at
least twice the capacity, so probes stay short even when the cache is full).
An entry is ``slot number + 1``; 0 is empty.  Deleting uses backward-shift
deletion, so there are no tombstones and a probe stops at the first empty
entry.

A *slot* is a 32-byte header followed by the key area and the value area::

    hash u32 | keylen u32 | vallen u32 | next_free u32 | hits u64 | expires i64
    key (keysize bytes) | value (blocksize bytes)      (size rounded up to 8)

``keylen == 0`` marks a free slot.  Slots are handed out from the free list
(freed slots, linked through ``next_free``), else from ``high``, the number of
slots ever used; slots at or above ``high`` have never been touched, so their
pages are never committed: memory in use follows the items stored, not the
size asked for.  ``clear`` empties the index and resets ``count``, ``high``
and the free list.

Expiry is lazy: ``expires`` is an absolute unix time in whole seconds (0 =
never); any operation that finds an expired item deletes it and then behaves
as if it had not been there.  ``hits`` counts ``get`` and routing lookups;
routing rotates ``a|b|c`` values with it (docs/behaviour.md, "Mappers"), and since
the counter is in the mapping the rotation is shared by every process.
"""

from __future__ import annotations

import fcntl
import mmap
import operator
import os
import re
import struct
import tempfile
import threading
import time
import weakref
import zlib
from typing import Dict, List, Optional, Tuple

from .log import log as _default_log
from .router import Route

DEFAULT_BLOCKSIZE = 65536
DEFAULT_KEYSIZE = 2048

_CONTROL = struct.Struct("=III4x")          # count, high, free_head
_HEADER = struct.Struct("=IIIIQq")          # hash, keylen, vallen, next_free, hits, expires
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_HITS_OFFSET = 16                           # offset of ``hits`` inside the header
_NEXT_FREE_OFFSET = 12


def _as_bytes(value) -> bytes:
    """Keys and values: bytes-like objects as they are, str as UTF-8."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError("a bytes-like object or str is required, not %r" % type(value).__name__)


# ---------------------------------------------------------------------------
# The lock


class _SharedLock:
    """Mutual exclusion among the threads of this process and the processes forked from it."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="uwsgi-fastrouter-cache-")
        self._fd = self._file.fileno()
        self._threads = threading.Lock()
        _FORK_GUARD.add(self)

    def acquire(self) -> None:
        self._threads.acquire()
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, 0)
        except BaseException:
            self._threads.release()
            raise

    def release(self) -> None:
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, 0)
        finally:
            self._threads.release()

    def __enter__(self) -> "_SharedLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _after_fork_in_child(self) -> None:
        # Record locks are not inherited, so the child holds none; a thread lock
        # copied while another thread held it would never be released: start afresh.
        self._threads = threading.Lock()

    def close(self) -> None:
        _FORK_GUARD.discard(self)
        self._file.close()


_FORK_GUARD: "weakref.WeakSet[_SharedLock]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for lock in list(_FORK_GUARD):
        lock._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------------------
# One cache


class Cache:
    """One named cache with uWSGI's semantics, stored in shared memory (see module doc)."""

    def __init__(self, name: str, items: int, blocksize: int = DEFAULT_BLOCKSIZE,
                 keysize: int = DEFAULT_KEYSIZE, clock=time.time, log=_default_log) -> None:
        items = operator.index(items)
        blocksize = operator.index(blocksize)
        keysize = operator.index(keysize)
        if items < 1:
            raise ValueError('invalid number of items for cache "%s": %d' % (name, items))
        if blocksize < 1:
            raise ValueError('invalid cache blocksize for "%s"' % name)
        if keysize < 1:
            raise ValueError('invalid cache keysize for "%s"' % name)
        if items > 0xFFFFFFFE:
            raise ValueError('too many items for cache "%s": %d' % (name, items))
        self.name = name
        self.items = items
        self.capacity = items - 1          # uWSGI reserves item 0
        self.blocksize = blocksize
        self.keysize = keysize
        self.clock = clock
        self._log = log

        index_size = 8
        while index_size < 2 * self.capacity:
            index_size *= 2
        self._mask = index_size - 1
        self.index_size = index_size
        self.slot_size = (_HEADER.size + keysize + blocksize + 7) & ~7
        self._index_offset = _CONTROL.size
        self._slots_offset = self._index_offset + 4 * index_size
        self.size = self._slots_offset + self.capacity * self.slot_size
        try:
            self._mm = mmap.mmap(-1, self.size)
        except (OSError, OverflowError, ValueError) as exc:
            raise ValueError('unable to allocate %d bytes (%dMB) for cache "%s": %s'
                             % (self.size, self.size // (1024 * 1024), name, exc))
        self._index = memoryview(self._mm)[self._index_offset:self._slots_offset].cast("I")
        try:
            self._lock = _SharedLock()
        except OSError as exc:
            self._index.release()
            self._mm.close()
            raise ValueError('unable to create the lock file of cache "%s": %s' % (name, exc))

    def __repr__(self) -> str:
        return "<Cache %r items=%d blocksize=%d keysize=%d>" % (
            self.name, self.items, self.blocksize, self.keysize)

    def close(self) -> None:
        """Unmap the memory (only for tests and tools; a router keeps its caches)."""
        self._index.release()
        self._mm.close()
        self._lock.close()

    # -- low level (call with the lock held) ---------------------------------

    def _slot_offset(self, slot: int) -> int:
        return self._slots_offset + slot * self.slot_size

    def _find(self, key: bytes, khash: int) -> Tuple[int, int]:
        """(index position, slot) of *key*; slot -1 and the free position if absent."""
        index = self._index
        mask = self._mask
        mm = self._mm
        pos = khash & mask
        keylen = len(key)
        while True:
            entry = index[pos]
            if entry == 0:
                return pos, -1
            slot = entry - 1
            off = self._slot_offset(slot)
            shash, skeylen = struct.unpack_from("=II", mm, off)
            if shash == khash and skeylen == keylen:
                start = off + _HEADER.size
                if mm[start:start + keylen] == key:
                    return pos, slot
            pos = (pos + 1) & mask

    def _expired(self, slot: int, now: int) -> bool:
        expires = struct.unpack_from("=q", self._mm, self._slot_offset(slot) + 24)[0]
        return expires != 0 and expires <= now

    def _remove(self, pos: int, slot: int) -> None:
        """Take *slot* (found at index position *pos*) out of the index, free it."""
        index = self._index
        mask = self._mask
        mm = self._mm
        index[pos] = 0
        hole = pos
        nxt = pos
        while True:
            nxt = (nxt + 1) & mask
            entry = index[nxt]
            if entry == 0:
                break
            home = _U32.unpack_from(mm, self._slot_offset(entry - 1))[0] & mask
            # The entry may stay where it is if its home lies cyclically in (hole, nxt].
            if hole <= nxt:
                stays = hole < home <= nxt
            else:
                stays = home > hole or home <= nxt
            if not stays:
                index[hole] = entry
                index[nxt] = 0
                hole = nxt
        count, high, free = _CONTROL.unpack_from(mm, 0)
        off = self._slot_offset(slot)
        _HEADER.pack_into(mm, off, 0, 0, 0, free, 0, 0)
        _CONTROL.pack_into(mm, 0, count - 1, high, slot + 1)

    def _allocate(self) -> int:
        """A free slot number, or -1 when the cache is full."""
        mm = self._mm
        count, high, free = _CONTROL.unpack_from(mm, 0)
        if free:
            slot = free - 1
            next_free = _U32.unpack_from(mm, self._slot_offset(slot) + _NEXT_FREE_OFFSET)[0]
            _CONTROL.pack_into(mm, 0, count + 1, high, next_free)
            return slot
        if high < self.capacity:
            _CONTROL.pack_into(mm, 0, count + 1, high + 1, free)
            return high
        return -1

    def _lookup(self, key: bytes, now: int) -> Tuple[int, int]:
        """Like :meth:`_find`, deleting the item first if it has expired."""
        khash = zlib.crc32(key)
        pos, slot = self._find(key, khash)
        if slot >= 0 and self._expired(slot, now):
            self._remove(pos, slot)
            pos, slot = self._find(key, khash)
        return pos, slot

    def _value(self, slot: int) -> bytes:
        off = self._slot_offset(slot)
        vallen = _U32.unpack_from(self._mm, off + 8)[0]
        start = off + _HEADER.size + self.keysize
        return self._mm[start:start + vallen]

    def _count_hit(self, slot: int) -> int:
        """Add one hit to *slot*; return the count before."""
        off = self._slot_offset(slot) + _HITS_OFFSET
        hits = _U64.unpack_from(self._mm, off)[0]
        _U64.pack_into(self._mm, off, (hits + 1) & 0xFFFFFFFFFFFFFFFF)
        return hits

    def _insert(self, pos: int, key: bytes, value: bytes, expires_at: int) -> bool:
        slot = self._allocate()
        if slot < 0:
            self._log('*** DANGER cache "%s" is FULL !!! ***' % self.name)
            return False
        mm = self._mm
        off = self._slot_offset(slot)
        _HEADER.pack_into(mm, off, zlib.crc32(key), len(key), len(value), 0, 0, expires_at)
        start = off + _HEADER.size
        mm[start:start + len(key)] = key
        start += self.keysize
        mm[start:start + len(value)] = value
        self._index[pos] = slot + 1
        return True

    def _checked(self, key, value, expires) -> Optional[Tuple[bytes, bytes, int]]:
        """Converted (key, value, absolute expiry), or None if uWSGI would refuse them."""
        key = _as_bytes(key)
        value = _as_bytes(value)
        expires = operator.index(expires)
        if not key or len(key) > self.keysize or not value or len(value) > self.blocksize:
            return None
        if expires < 0:
            return None
        return key, value, (int(self.clock()) + expires) if expires else 0

    # -- the API ---------------------------------------------------------------

    def set(self, key, value, expires: int = 0) -> bool:
        """Store a new item; False if *key* exists, the item is refused or the cache is full."""
        checked = self._checked(key, value, expires)
        if checked is None:
            return False
        key, value, expires_at = checked
        with self._lock:
            pos, slot = self._lookup(key, int(self.clock()))
            if slot >= 0:
                return False
            return self._insert(pos, key, value, expires_at)

    def update(self, key, value, expires: int = 0) -> bool:
        """Store or overwrite an item (its hit counter is kept); False if refused or full."""
        checked = self._checked(key, value, expires)
        if checked is None:
            return False
        key, value, expires_at = checked
        with self._lock:
            pos, slot = self._lookup(key, int(self.clock()))
            if slot < 0:
                return self._insert(pos, key, value, expires_at)
            mm = self._mm
            off = self._slot_offset(slot)
            struct.pack_into("=I", mm, off + 8, len(value))
            struct.pack_into("=q", mm, off + 24, expires_at)
            start = off + _HEADER.size + self.keysize
            mm[start:start + len(value)] = value
            return True

    def get(self, key) -> Optional[bytes]:
        """The value of *key* or None; counts a hit on the item."""
        found = self._get_counting(key)
        return None if found is None else found[1]

    def _get_counting(self, key) -> Optional[Tuple[int, bytes]]:
        """(hits before this lookup, value) of *key*, counting a hit; None if absent."""
        key = _as_bytes(key)
        with self._lock:
            _pos, slot = self._lookup(key, int(self.clock()))
            if slot < 0:
                return None
            return self._count_hit(slot), self._value(slot)

    def lookup_for_route(self, key: bytes) -> Optional[bytes]:
        """The routing text for *key* (docs/behaviour.md, "Mappers"), or None.

        A value ``a|b|c`` gives part number ``hits % 3``, where *hits* is the item's
        hit counter before this lookup; the lookup counts a hit.  The part returned
        may still carry a ``,MODIFIER1`` suffix.
        """
        found = self._get_counting(key)
        if found is None:
            return None
        hits, value = found
        if b"|" in value:
            parts = value.split(b"|")
            value = parts[hits % len(parts)]
        return value

    def hits(self, key) -> Optional[int]:
        """The hit counter of *key* (None if absent); does not count a hit."""
        key = _as_bytes(key)
        with self._lock:
            _pos, slot = self._lookup(key, int(self.clock()))
            if slot < 0:
                return None
            return _U64.unpack_from(self._mm, self._slot_offset(slot) + _HITS_OFFSET)[0]

    def delete(self, key) -> bool:
        """Remove *key*; False if it was not there."""
        key = _as_bytes(key)
        with self._lock:
            pos, slot = self._lookup(key, int(self.clock()))
            if slot < 0:
                return False
            self._remove(pos, slot)
            return True

    def exists(self, key) -> bool:
        key = _as_bytes(key)
        with self._lock:
            return self._lookup(key, int(self.clock()))[1] >= 0

    def clear(self) -> None:
        """Remove every item."""
        with self._lock:
            self._mm[self._index_offset:self._slots_offset] = bytes(self._slots_offset
                                                                    - self._index_offset)
            _CONTROL.pack_into(self._mm, 0, 0, 0, 0)

    def keys(self) -> List[bytes]:
        """The keys of every live item, in slot order (insertion order until slots are reused)."""
        mm = self._mm
        now = int(self.clock())
        found: List[bytes] = []
        expired: List[bytes] = []
        with self._lock:
            high = _CONTROL.unpack_from(mm, 0)[1]
            for slot in range(high):
                off = self._slot_offset(slot)
                keylen = _U32.unpack_from(mm, off + 4)[0]
                if not keylen:
                    continue
                start = off + _HEADER.size
                key = mm[start:start + keylen]
                (expired if self._expired(slot, now) else found).append(key)
            for key in expired:
                self._lookup(key, now)      # deletes it
        return found

    def __len__(self) -> int:
        """Items stored (expired ones not yet noticed included)."""
        with self._lock:
            return _CONTROL.unpack_from(self._mm, 0)[0]

    def banner(self) -> str:
        """uWSGI's start-up line for this cache, with this implementation's sizes."""
        key_bytes = _HEADER.size + self.keysize
        return ('*** Cache "%s" initialized: %dMB (key: %d bytes, keys: %d bytes, data: %d bytes, '
                'bitmap: 0 bytes) preallocated ***'
                % (self.name, self.size // (1024 * 1024), key_bytes, key_bytes * self.capacity,
                   self.blocksize * self.capacity))


# ---------------------------------------------------------------------------
# --cache / --cache2


_CACHE2_ITEMS = ("items", "max_items", "maxitems")
_LEADING_NUMBER = re.compile(r"\s*([+-]?)(\d*)")


def _unsigned(text: str) -> Optional[int]:
    """strtoul-like: leading digits (junk after them ignored); None when negative."""
    match = _LEADING_NUMBER.match(text)
    if match.group(1) == "-" and match.group(2).strip("0"):
        return None
    return int(match.group(2)) if match.group(2) else 0


def _split_kv(value: str) -> List[str]:
    """Split at commas; a backslash makes the next character literal."""
    parts: List[str] = []
    current: List[str] = []
    chars = iter(value)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ",":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_cache2(value: str) -> dict:
    """Parse a ``--cache2`` value into ``{"name", "items", "blocksize", "keysize"}``.

    uWSGI's rules: ``key=value`` pairs separated by commas, ``\\`` escapes the next
    character, the last occurrence of a key wins, ``max_items``/``maxitems`` are
    aliases of ``items``, other keys (and words without ``=``) are ignored, a
    blocksize or keysize of 0 means the default.  Raises :class:`ValueError`
    naming *value* when the name or the item count is missing or a size is invalid.
    """
    fields: Dict[str, str] = {}
    for part in _split_kv(value):
        name, sep, text = part.partition("=")
        if sep:
            fields[name.strip()] = text
    name = fields.get("name", "")
    if not name:
        raise ValueError('invalid --cache2 value "%s": you have to specify a cache name' % value)
    items = 0
    for alias in _CACHE2_ITEMS:
        if alias in fields:
            items = _unsigned(fields[alias])
            if items is None:
                raise ValueError('invalid --cache2 value "%s": the number of items must not be '
                                 'negative' % value)
    if not items:
        raise ValueError('invalid --cache2 value "%s": you have to specify the maximum number '
                         'of cache items' % value)
    result = {"name": name, "items": items, "blocksize": DEFAULT_BLOCKSIZE,
              "keysize": DEFAULT_KEYSIZE}
    for field in ("blocksize", "keysize"):
        if field in fields:
            number = _unsigned(fields[field])
            if number is None:
                raise ValueError('invalid --cache2 value "%s": invalid cache %s for "%s"'
                                 % (value, field, name))
            if number:
                result[field] = number
    return result


class CacheRegistry:
    """The caches of one router, in creation order; :attr:`default` is the first.

    Create every cache before forking router processes (the memory is shared
    through the fork).
    """

    def __init__(self, clock=time.time, log=_default_log) -> None:
        self.caches: List[Cache] = []
        self.clock = clock
        self._log = log

    @classmethod
    def from_options(cls, cache: int = 0, cache_blocksize: int = 0, cache2=(),
                     clock=time.time, log=_default_log) -> "CacheRegistry":
        """``--cache N`` (named "default", created first when N > 0), then each ``--cache2``."""
        registry = cls(clock=clock, log=log)
        if cache:
            registry.add_cache("default", cache, cache_blocksize or DEFAULT_BLOCKSIZE)
        for spec in cache2:
            registry.add_cache2(spec)
        return registry

    def add_cache(self, name: str, items: int, blocksize: int = DEFAULT_BLOCKSIZE,
                  keysize: int = DEFAULT_KEYSIZE) -> Cache:
        cache = Cache(name, items, blocksize, keysize, clock=self.clock, log=self._log)
        self.caches.append(cache)
        self._log(cache.banner())
        return cache

    def add_cache2(self, value: str) -> Cache:
        spec = parse_cache2(value)
        return self.add_cache(spec["name"], spec["items"], spec["blocksize"], spec["keysize"])

    @property
    def default(self) -> Optional[Cache]:
        return self.caches[0] if self.caches else None

    def get(self, name: Optional[str] = None) -> Optional[Cache]:
        """The cache called *name* (the first of that name), or the default one for None/""."""
        if not name:
            return self.default
        for cache in self.caches:
            if cache.name == name:
                return cache
        return None

    def __len__(self) -> int:
        return len(self.caches)

    def __iter__(self):
        return iter(self.caches)

    def close(self) -> None:
        for cache in self.caches:
            cache.close()
        self.caches = []


# ---------------------------------------------------------------------------
# The mapper


def _atoi_modifier(text: bytes) -> int:
    """C ``atoi`` of the text after the comma, stored in a byte as uWSGI does."""
    match = re.match(rb"\s*([+-]?)(\d*)", text)
    number = int(match.group(2)) if match.group(2) else 0
    if match.group(1) == b"-":
        number = -number
    return number & 0xFF


class CacheMapper:
    """``--fastrouter-use-cache[=NAME]``: the key's cache value is the backend address.

    Missing key -> None.  ``a|b|c`` values rotate with the item's hit counter;
    ``ADDR,N`` sets modifier1 to N.  Construction fails with uWSGI's message when
    the cache does not exist.
    """

    def __init__(self, registry: CacheRegistry, name: Optional[str] = None) -> None:
        cache = registry.get(name)
        if cache is None:
            if name:
                raise ValueError('!!! unable to find cache "%s" !!!' % name)
            raise ValueError("you need to create a uwsgi cache to use the uWSGI fastrouter "
                             "(add --cache <n>)")
        self.cache = cache

    def __call__(self, key: bytes) -> Optional[Route]:
        value = self.cache.lookup_for_route(key)
        if value is None:
            return None
        address, comma, modifier = value.partition(b",")
        if not address:
            return None
        return Route(address, _atoi_modifier(modifier) if comma else 0, 0)
