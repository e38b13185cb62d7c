"""Bit packing of quantization codes into uint32 words along K.

Codes are integers in [0, 2**bits) laid out as W is, [..., K, N]; packed words are
[..., K * bits // 32, N] uint32. Packing runs along K (the reduction axis of y = x @ W), so one
row of words holds codes for all N output columns and a kernel streams whole rows.

Layout "planar" (the only one so far). K is cut into tiles; inside a tile every slot of a word
holds one *slab* of `slab` consecutive K rows, so unpacking slot j of the tile's words with one
shift and one mask yields the contiguous rows [j * slab, (j + 1) * slab) of that tile. No
stack/interleave is needed to put rows back in order, which matters because interleaving does
not lower on Mosaic GPU (see the design's mgpu_unpack_probe.py).

- bits 2, 4, 8: a tile is `32 // bits` slabs in `slab` words; word w, slot j holds row
  j * slab + w at bit offset bits * j. Exactly `bits` bits per code.
- bits 3 (zero waste, 32 codes in 3 words): a tile is 32 slabs in three planes of `slab` words.
  Plane p (p = 0, 1, 2) holds slots 10p .. 10p + 9 in its bits 0..29 (slot 10p + i at 3i).
  The two remaining slots use the planes' top two bits: slot 30's low two bits sit in plane 0
  bits 30-31, slot 31's low two bits in plane 1 bits 30-31, and their high bits in plane 2 bit 30
  (slot 30) and bit 31 (slot 31). Every slot still unpacks with shifts, masks and one OR.
"""

from __future__ import annotations

import jax.numpy as jnp

SUPPORTED_BITS = (2, 3, 4, 8)
MAX_SLAB = 32


def slots_per_tile(bits: int) -> int:
    """Number of slabs in one planar tile."""
    return 32 if bits == 3 else 32 // bits


def words_per_slab_row(bits: int) -> int:
    """Words one slab position occupies across a tile's planes (3 for 3-bit, else 1)."""
    return 3 if bits == 3 else 1


def default_slab(k: int, bits: int) -> int:
    """Largest power of two <= MAX_SLAB such that K is a whole number of tiles.

    K must already be a multiple of `slots_per_tile(bits)` (checked by `check_packable`).
    """
    tiles_times_slab = k // slots_per_tile(bits)
    slab = MAX_SLAB
    while tiles_times_slab % slab:
        slab //= 2
    return slab


def check_packable(k: int, bits: int, slab: int | None = None) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; supported: {SUPPORTED_BITS}")
    per = slots_per_tile(bits)
    if k % per:
        raise ValueError(
            f"K={k} cannot be packed at {bits} bits: K must be a multiple of {per} "
            f"({'32 codes in 3 words' if bits == 3 else f'{per} codes per uint32 word'})")
    if slab is not None and (slab <= 0 or k % (per * slab)):
        raise ValueError(f"slab={slab} does not tile K={k} at {bits} bits (need K % {per * slab} == 0)")


def pack(codes: jnp.ndarray, bits: int, slab: int | None = None) -> jnp.ndarray:
    """Pack codes [..., K, N] (values in [0, 2**bits)) into uint32 words [..., K*bits//32, N]."""
    *lead, k, n = codes.shape
    check_packable(k, bits, slab)
    slab = default_slab(k, bits) if slab is None else slab
    per = slots_per_tile(bits)
    q = codes.astype(jnp.uint32).reshape(*lead, k // (per * slab), per, slab, n)
    slot = lambda j: q[..., j, :, :]  # [..., T, slab, N]
    if bits == 3:
        planes = []
        for p in range(3):
            word = slot(10 * p)
            for i in range(1, 10):
                word = word | (slot(10 * p + i) << jnp.uint32(3 * i))
            planes.append(word)
        s30, s31 = slot(30), slot(31)
        planes[0] = planes[0] | ((s30 & 3) << 30)
        planes[1] = planes[1] | ((s31 & 3) << 30)
        planes[2] = planes[2] | ((s30 >> 2) << 30) | ((s31 >> 2) << 31)
        words = jnp.stack(planes, axis=-3)  # [..., T, 3, slab, N]
    else:
        words = slot(0)
        for j in range(1, per):
            words = words | (slot(j) << jnp.uint32(bits * j))
    return words.reshape(*lead, k * bits // 32, n)


def unpack_slot(words_tile: jnp.ndarray, bits: int, j: int) -> jnp.ndarray:
    """Slot j of one or more tiles: words_tile [..., words_per_slab_row*slab, N] -> [..., slab, N].

    This is the per-slab shift-and-mask a kernel runs; `unpack` applies it to every slot.
    """
    mask = jnp.uint32(2**bits - 1)
    if bits != 3:
        return (words_tile >> jnp.uint32(bits * j)) & mask
    slab = words_tile.shape[-2] // 3
    plane = lambda p: words_tile[..., p * slab:(p + 1) * slab, :]
    if j < 30:
        return (plane(j // 10) >> jnp.uint32(3 * (j % 10))) & mask
    low = (plane(j - 30) >> jnp.uint32(30)) & jnp.uint32(3)
    high = (plane(2) >> jnp.uint32(j)) & jnp.uint32(1)  # bit 30 for slot 30, bit 31 for slot 31
    return low | (high << jnp.uint32(2))


def unpack(words: jnp.ndarray, bits: int, k: int, slab: int | None = None) -> jnp.ndarray:
    """Inverse of `pack`: words [..., K*bits//32, N] -> codes [..., K, N] (uint32)."""
    *lead, kw, n = words.shape
    check_packable(k, bits, slab)
    if kw * 32 != k * bits:
        raise ValueError(f"packed words {tuple(words.shape)} do not hold K={k} codes of {bits} bits")
    slab = default_slab(k, bits) if slab is None else slab
    per = slots_per_tile(bits)
    tiles = words.reshape(*lead, k // (per * slab), words_per_slab_row(bits) * slab, n)
    slabs = [unpack_slot(tiles, bits, j) for j in range(per)]
    return jnp.stack(slabs, axis=-3).reshape(*lead, k, n)
