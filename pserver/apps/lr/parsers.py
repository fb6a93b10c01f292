"""Compiled line parsers for libsvm and Criteo TSV text.

Each parser fills preallocated arrays (labels, per-row counts, keys, values) in one pass over a
buffer of whole lines, hashing features as it goes. Binary values are not stored while ones[0] is 1.
Both return (rows, entries, bad, code, line, offset): code 0 - `line` lines and `offset` bytes were
consumed (offset < buf.size: the arrays are full; grow them and parse on); code > 0 (see REASONS) -
line `line` (from 0, blank ones too), at byte `offset`, is bad, unless skip_bad rolled it back and
counted it. Why no sizing pass and no value traffic: docs/lr.md, "Data formats"."""

from __future__ import annotations

import numba
import numpy as np

from .hashing import fnv1a64_bytes, mix64_scalar, salt_scalar

NEWLINE, SPACE, TAB, CR, HASH, COLON = 10, 32, 9, 13, 35, 58

# Error codes returned by the parsers; the reader turns them into DataFormatError messages.
REASONS = {
    1: "label is not a number",
    2: "label must be -1, 0, +1 or 1",
    3: "feature must be idx:value with idx a non-negative integer below 2**63",
    4: "feature value is not a number",
    5: "expected 40 tab-separated fields (label, 13 integer columns, 26 categorical columns)",
    6: "label must be 0 or 1",
    7: "integer column is not an integer",
}
CRITEO_INT_COLUMNS = 13
CRITEO_CAT_COLUMNS = 26


@numba.njit(cache=True, nogil=True, inline="always")
def _is_space(c: np.uint8) -> bool:
    return c in (SPACE, TAB, CR)


@numba.njit(cache=True, nogil=True, inline="always")
def _ends_token(buf, j, n) -> bool:
    """Whether buf[j] ends a token: end of buffer, whitespace or newline."""
    return j >= n or buf[j] == NEWLINE or _is_space(buf[j])


@numba.njit(cache=True, nogil=True, inline="always")
def _digits(buf, j, e, v):
    """Accumulate decimal digits from buf[j:e] into v -> (v, next index, digits, dropped): digits
    past 18 significant ones are counted in `dropped`, not accumulated (float32 needs 9)."""
    start = j
    dropped = 0
    while j < e:
        d = np.int64(buf[j]) - 48
        if d < 0 or d > 9:
            break
        if v < 100000000000000000:
            v = v * 10 + d
        else:
            dropped += 1
        j += 1
    return v, j, j - start, dropped


@numba.njit(cache=True, nogil=True, inline="always")
def _parse_float(buf, j, e):
    """Decimal float at buf[j:e] -> (value, next index, ok). Accepts [+-]digits[.digits][e[+-]d]."""
    neg = False
    if j < e and (buf[j] == 45 or buf[j] == 43):
        neg = buf[j] == 45
        j += 1
    mant, j, nint, drop = _digits(buf, j, e, np.int64(0))
    exp10 = drop
    nfrac = 0
    if j < e and buf[j] == 46:
        mant, j, nfrac, drop = _digits(buf, j + 1, e, mant)
        exp10 -= nfrac - drop
    if nint + nfrac == 0:
        return 0.0, j, False
    if j < e and (buf[j] == 101 or buf[j] == 69):
        j += 1
        eneg = False
        if j < e and (buf[j] == 45 or buf[j] == 43):
            eneg = buf[j] == 45
            j += 1
        ed, j, edig, drop = _digits(buf, j, e, np.int64(0))
        if edig == 0 or edig > 4:
            return 0.0, j, False
        exp10 += -ed if eneg else ed
    v = float(mant)
    if exp10 > 0:
        v = v * 10.0 ** exp10
    elif exp10 < 0:
        # Dividing by an exact power of ten is more accurate than multiplying by 10**-k.
        v = v / 10.0 ** (-exp10) if exp10 > -300 else (v / 1e300) / 10.0 ** (-exp10 - 300)
    return (-v if neg else v), j, True


@numba.njit(cache=True, nogil=True, inline="always")
def _parse_int(buf, j, e):
    """Signed decimal integer at buf[j:e] -> (value, next index, ok); at most 18 digits."""
    neg = False
    if j < e and (buf[j] == 45 or buf[j] == 43):
        neg = buf[j] == 45
        j += 1
    v, j, nd, drop = _digits(buf, j, e, np.int64(0))
    if nd == 0 or drop > 0:
        return np.int64(0), j, False
    return (-v if neg else v), j, True


@numba.njit(cache=True, nogil=True)
def parse_libsvm(buf, raw_keys, skip_bad, labels, row_nnz, keys, vals, ones):
    """Parse libsvm lines `label idx:val idx:val ... [# comment]`.

    Blank and comment lines are skipped silently. Stops before a line that does not fit into
    labels/row_nnz or keys/vals. Returns as the module docstring says.
    """
    n = buf.size
    salt = salt_scalar(0)
    cap = keys.size
    all_ones = ones[0] != 0
    i = 0
    line = 0
    nr = 0
    ne = 0
    nbad = 0
    while i < n:
        # One pass over the bytes: a newline ends every number and token scan.
        j = i
        while j < n and _is_space(buf[j]):
            j += 1
        code = 0
        ne0 = ne
        if j < n and buf[j] != NEWLINE and buf[j] != HASH:
            if nr >= labels.size:
                return nr, ne, nbad, 0, line, i   # full: the caller grows the arrays
            lab, j, ok = _parse_float(buf, j, n)
            if not ok or not _ends_token(buf, j, n):
                code = 1
            elif not (lab == 1.0 or lab == 0.0 or lab == -1.0):
                code = 2
            while code == 0:
                while j < n and _is_space(buf[j]):
                    j += 1
                if j >= n or buf[j] == NEWLINE or buf[j] == HASH:
                    break
                idx, j, ok = _parse_int(buf, j, n)
                if not ok or idx < 0 or j >= n or buf[j] != COLON:
                    code = 3
                    break
                j += 1
                d = np.int64(buf[j]) - 48 if j < n else -1
                if 0 <= d <= 9 and _ends_token(buf, j + 1, n):   # one digit: binary data
                    v = float(d)
                    j += 1
                else:
                    v, j, ok = _parse_float(buf, j, n)
                    if not ok or not _ends_token(buf, j, n):
                        code = 4
                        break
                if ne >= cap:
                    return nr, ne0, nbad, 0, line, i   # full: roll the line back
                k = np.uint64(idx)
                keys[ne] = k if raw_keys else mix64_scalar(k ^ salt)
                if all_ones and v != 1.0:
                    vals[:ne] = 1.0
                    all_ones = False
                    ones[0] = 0
                if not all_ones:
                    vals[ne] = v
                ne += 1
            if code != 0:
                if not skip_bad:
                    return nr, ne, nbad, code, line, i
                ne = ne0
                nbad += 1
            else:
                labels[nr] = 1.0 if lab > 0 else -1.0
                row_nnz[nr] = ne - ne0
                nr += 1
        while j < n and buf[j] != NEWLINE:   # a comment, or the rest of a bad line
            j += 1
        line += 1
        i = j + 1
    return nr, ne, nbad, 0, line, n


@numba.njit(cache=True, nogil=True)
def _int_bin(v, log_bins):
    # Values <= 2 keep their own bin; larger ones share bins 3 + floor(ln(v)**2), which never
    # collide with the small ones.
    if not log_bins or v <= 2:
        return v
    lv = np.log(float(v))
    return np.int64(3 + np.floor(lv * lv))


@numba.njit(cache=True, nogil=True)
def parse_criteo(buf, log_bins, skip_bad, labels, row_nnz, keys, vals, ones):
    """Parse Criteo TSV lines: label, 13 integer columns, 26 categorical columns; empty = missing.

    Integer column c (1..13) value v -> int_key(bin(v), c); categorical column c (14..39) string
    s -> str_key(s, c); every feature value is 1 (stored only if ones[0] is 0). Stops before a
    line when labels/row_nnz are full or keys/vals have room for fewer than 39 more features.
    Returns like parse_libsvm.
    """
    n = buf.size
    store = ones[0] == 0
    i = 0
    line = 0
    nr = 0
    ne = 0
    nbad = 0
    nfields = 1 + CRITEO_INT_COLUMNS + CRITEO_CAT_COLUMNS
    while i < n:
        e = i
        while e < n and buf[e] != NEWLINE:
            e += 1
        end = e
        if end > i and buf[end - 1] == CR:
            end -= 1
        if end > i:
            if nr >= labels.size or ne + nfields - 1 > keys.size:
                return nr, ne, nbad, 0, line, i   # full: the caller grows the arrays
            ne0 = ne
            code = 0
            col = 0
            fs = i
            lab = 0.0
            while True:
                fe = fs
                while fe < end and buf[fe] != TAB:
                    fe += 1
                if col >= nfields:
                    code = 5
                    break
                if col == 0:
                    if fe - fs == 1 and (buf[fs] == 48 or buf[fs] == 49):
                        lab = 1.0 if buf[fs] == 49 else -1.0
                    else:
                        code = 6
                        break
                elif fe > fs:
                    if col <= CRITEO_INT_COLUMNS:
                        v, j, ok = _parse_int(buf, fs, fe)
                        if not ok or j != fe:
                            code = 7
                            break
                        b = np.uint64(_int_bin(v, log_bins))
                        keys[ne] = mix64_scalar(b ^ salt_scalar(col))
                    else:
                        keys[ne] = mix64_scalar(fnv1a64_bytes(buf, fs, fe) ^ salt_scalar(col))
                    if store:
                        vals[ne] = 1.0
                    ne += 1
                col += 1
                if fe >= end:
                    break
                fs = fe + 1
            if code == 0 and col != nfields:
                code = 5
            if code != 0:
                if not skip_bad:
                    return nr, ne, nbad, code, line, i
                ne = ne0
                nbad += 1
            else:
                labels[nr] = lab
                row_nnz[nr] = ne - ne0
                nr += 1
        line += 1
        i = e + 1
    return nr, ne, nbad, 0, line, n
