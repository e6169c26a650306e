"""16-lane vectors for numba kernels, written as LLVM vector IR through numba's extension API.

Numba's auto-vectoriser does not vectorise the block loops of quantised formats (the 16-wide inner
loop is unrolled to scalar code first, and SLP vectorisation is off in numba), which costs a factor
of 3-4 in mat-vec speed. These types make the vector explicit: a ``F32x16`` is an LLVM
``<16 x float>``, an ``I32x16`` a ``<16 x i32>``; LLVM lowers them to one AVX-512 register, two
AVX2 registers or four SSE registers, whatever the host has.

Operators: ``+ - *`` on F32x16 and ``+ - * & | << >>`` on I32x16 (``>>`` arithmetic), either
operand may be a scalar (broadcast to all lanes). Loads read raw bytes at any alignment and check no bounds: the caller
guarantees ``i + 16 * width <= len(a)``.

For integer dot products (8-bit weights and inputs, as ggml takes them) a ``U8x64`` holds 64 bytes:
two 32-value quant blocks. ``dot_u8_i8`` multiplies two of them into an I32x16 of 4-product sums;
lanes 0-7 belong to the first block, 8-15 to the second.
"""

import operator
import platform

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core import config as numba_config
from numba.core.imputils import lower_builtin
from numba.core.typing.templates import AbstractTemplate, infer_global, signature
from numba.extending import intrinsic, models, register_model

from .config import FASTMATH

LANES = 16
_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_F32 = ir.FloatType()
_VF = ir.VectorType(_F32, LANES)
_VI = ir.VectorType(_I32, LANES)
_VB = ir.VectorType(_I8, 4 * LANES)


class F32x16(types.Type):
    def __init__(self):
        super().__init__(name="F32x16")


class I32x16(types.Type):
    def __init__(self):
        super().__init__(name="I32x16")


class U8x64(types.Type):
    def __init__(self):
        super().__init__(name="U8x64")


f32x16 = F32x16()
i32x16 = I32x16()
u8x64 = U8x64()


@register_model(F32x16)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VF)


@register_model(I32x16)
class _I32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VI)


@register_model(U8x64)
class _U8x64Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VB)


# ---- helpers emitting IR -----------------------------------------------------------------------

def _const(ty, value):
    if isinstance(ty, ir.VectorType):
        return ir.Constant(ty, [value] * ty.count)
    return ir.Constant(ty, value)


def _splat(builder, value, vty):
    undef = ir.Constant(vty, ir.Undefined)
    one = builder.insert_element(undef, value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count))


def _element_ptr(context, builder, arytype, ary, index, indextype):
    data = context.make_array(arytype)(context, builder, ary).data
    index = context.cast(builder, index, indextype, types.intp)
    return builder.gep(data, [index], inbounds=True)


def _load(builder, ptr, elty, count):
    ty = ir.VectorType(elty, count) if count > 1 else elty
    return builder.load(builder.bitcast(ptr, ty.as_pointer()), align=1, typ=ty)


def _native_half_conversion() -> bool:
    """Whether the compile target converts half to float in hardware (x86 F16C, any aarch64)."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    if numba_config.CPU_NAME:  # a target other than the host, e.g. "generic" for portable caches
        return "+f16c" in (numba_config.CPU_FEATURES or "")
    return bool(llvm.get_host_cpu_features().get("f16c", False))


_NATIVE_HALF = _native_half_conversion()
NATIVE_HALF = _NATIVE_HALF  # whether store_half may be used


def _has_vnni() -> bool:
    """Whether the compile target has AVX-512 VNNI (vpdpbusd: 64 byte products summed in one instruction)."""
    if numba_config.CPU_NAME:
        return "+avx512vnni" in (numba_config.CPU_FEATURES or "")
    features = llvm.get_host_cpu_features()
    return bool(features.get("avx512vnni", False) and features.get("avx512bw", False))


_VNNI = _has_vnni()


def _half_to_f32(builder, h):
    """IEEE half bit patterns (low 16 bits of i32 lanes or scalar) -> float32, exact for every input.

    One instruction where the target converts halves in hardware. Elsewhere, integer arithmetic for
    normals, inf and NaN, and an exact int->float conversion for subnormals (so the result does not
    depend on the CPU's denormals-are-zero mode), instead of a libcall the JIT may not resolve.
    """
    ity = h.type
    fty = _VF if isinstance(ity, ir.VectorType) else _F32
    if _NATIVE_HALF:
        vector = isinstance(ity, ir.VectorType)
        i16 = ir.VectorType(_I16, ity.count) if vector else _I16
        half = ir.VectorType(ir.HalfType(), ity.count) if vector else ir.HalfType()
        return builder.fpext(builder.bitcast(builder.trunc(h, i16), half), fty)
    em = builder.and_(h, _const(ity, 0x7FFF))
    sign = builder.shl(builder.and_(h, _const(ity, 0x8000)), _const(ity, 16))
    shifted = builder.shl(em, _const(ity, 13))
    normal = builder.add(shifted, _const(ity, (127 - 15) << 23))
    special = builder.or_(shifted, _const(ity, 0x7F800000))
    subnormal = builder.bitcast(builder.fmul(builder.sitofp(em, fty), _const(fty, 2.0 ** -24)), ity)
    bits = builder.select(builder.icmp_unsigned(">=", em, _const(ity, 0x7C00)), special, normal)
    bits = builder.select(builder.icmp_unsigned("<", em, _const(ity, 0x0400)), subnormal, bits)
    return builder.bitcast(builder.or_(bits, sign), fty)


def _is_array(a, dtype):
    return isinstance(a, types.Array) and a.ndim == 1 and a.dtype == dtype


# ---- loads, stores, conversions ----------------------------------------------------------------

@intrinsic
def zeros(typingctx):
    """F32x16 of zeros."""
    def codegen(context, builder, sig, args):
        return _const(_VF, 0.0)
    return f32x16(), codegen


def _int_loader(name, elty, signed, doc):
    def typer(typingctx, a, i):
        if not (_is_array(a, types.uint8) and isinstance(i, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            v = _load(builder, ptr, elty, LANES)
            return builder.sext(v, _VI) if signed else (v if elty == _I32 else builder.zext(v, _VI))
        return i32x16(a, i), codegen
    typer.__name__ = typer.__qualname__ = name
    typer.__doc__ = doc
    return intrinsic(typer)


load_u8 = _int_loader("load_u8", _I8, False, "I32x16 of the uint8 at a[i:i+16] (a: uint8 1-D), zero-extended.")
load_i8 = _int_loader("load_i8", _I8, True, "I32x16 of the int8 at a[i:i+16] (a: uint8 1-D), sign-extended.")
load_u16 = _int_loader("load_u16", _I16, False,
                       "I32x16 of the 16 little-endian uint16 at bytes a[i:i+32] (a: uint8 1-D).")
load_u32 = _int_loader("load_u32", _I32, False,
                       "I32x16 of the 16 little-endian 32-bit words at bytes a[i:i+64] (a: uint8 1-D).")


@intrinsic
def load_f16(typingctx, a, i):
    """float32 scalar of the IEEE half at bytes a[i:i+2] (a: uint8 1-D)."""
    if not (_is_array(a, types.uint8) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        return _half_to_f32(builder, builder.zext(_load(builder, ptr, _I16, 1), _I32))
    return types.float32(a, i), codegen


@intrinsic
def load_f32(typingctx, a, i):
    """F32x16 of a[i:i+16] (a: float32 1-D, i an element index)."""
    if not (_is_array(a, types.float32) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return _load(builder, _element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1]),
                     _F32, LANES)
    return f32x16(a, i), codegen


@intrinsic
def store_f32(typingctx, a, i, v):
    """a[i:i+16] = v (a: float32 1-D, i an element index, v: F32x16)."""
    if not (_is_array(a, types.float32) and isinstance(i, types.Integer) and v == f32x16):
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        builder.store(args[2], builder.bitcast(ptr, _VF.as_pointer()), align=1)
        return context.get_dummy_value()
    return types.none(a, i, v), codegen


@intrinsic
def to_f32(typingctx, v):
    """F32x16 of the I32x16 lanes converted as signed integers."""
    if v != i32x16:
        return None

    def codegen(context, builder, sig, args):
        return builder.sitofp(args[0], _VF)
    return f32x16(v), codegen


@intrinsic
def bits_to_f32(typingctx, v):
    """F32x16 whose bit patterns are the I32x16 lanes (a bitcast)."""
    if v != i32x16:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _VF)
    return f32x16(v), codegen


@intrinsic
def half_to_f32(typingctx, v):
    """F32x16 of the IEEE half bit patterns held in the low 16 bits of the I32x16 lanes; for a uint16
    scalar (an element of an f16 cache), the float32 it holds."""
    if v == i32x16:
        return f32x16(v), lambda context, builder, sig, args: _half_to_f32(builder, args[0])
    if v != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        return _half_to_f32(builder, builder.zext(args[0], _I32))
    return types.float32(v), codegen


@intrinsic
def store_half(typingctx, a, i, v):
    """a[i:i+16] = the IEEE half bits of v rounded to half (nearest, ties to even) (a: uint16 1-D, i an
    element index, v: F32x16): one conversion, so only where NATIVE_HALF (elsewhere LLVM would call a
    library function the JIT may lack)."""
    if not (_is_array(a, types.uint16) and isinstance(i, types.Integer) and v == f32x16):
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        half = builder.fptrunc(args[2], ir.VectorType(ir.HalfType(), LANES))
        builder.store(half, builder.bitcast(ptr, half.type.as_pointer()), align=1)
        return context.get_dummy_value()
    return types.none(a, i, v), codegen


@intrinsic
def hsum(typingctx, v):
    """float32 sum of the 16 lanes (a fixed tree order)."""
    if v != f32x16:
        return None

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_F32, _VF]),
                                            "llvm.vector.reduce.fadd.v16f32")
        return builder.call(fn, [_const(_F32, 0.0), args[0]], fastmath=tuple(sorted(FASTMATH)))
    return types.float32(v), codegen


# ---- 8-bit integer dot products ----------------------------------------------------------------

def _indices(values):
    return ir.Constant(ir.VectorType(_I32, len(values)), list(values))


@intrinsic
def load_nibbles(typingctx, a, i, j):
    """U8x64 of the 4-bit values of two Q4 blocks in value order: the low nibbles of the 16 bytes
    a[i:i+16], their high nibbles, then the same of a[j:j+16] (a: uint8 1-D)."""
    if not (_is_array(a, types.uint8) and isinstance(i, types.Integer) and isinstance(j, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        first = _load(builder, _element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1]), _I8, 16)
        second = _load(builder, _element_ptr(context, builder, sig.args[0], args[0], args[2], sig.args[2]), _I8, 16)
        both = builder.shuffle_vector(first, second, _indices(range(32)))
        low = builder.and_(both, _const(both.type, 15))
        high = builder.lshr(both, _const(both.type, 4))
        order = [*range(16), *range(32, 48), *range(16, 32), *range(48, 64)]
        return builder.shuffle_vector(low, high, _indices(order))
    return u8x64(a, i, j), codegen


@intrinsic
def load_bytes(typingctx, a, i, j):
    """U8x64 of a[i:i+32] then a[j:j+32] (a: uint8 or int8 1-D; i == j + 32 reads 64 bytes in a row)."""
    if not (isinstance(a, types.Array) and a.ndim == 1 and a.dtype in (types.uint8, types.int8)
            and isinstance(i, types.Integer) and isinstance(j, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        first = _load(builder, _element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1]), _I8, 32)
        second = _load(builder, _element_ptr(context, builder, sig.args[0], args[0], args[2], sig.args[2]), _I8, 32)
        return builder.shuffle_vector(first, second, _indices(range(64)))
    return u8x64(a, i, j), codegen


@intrinsic
def flip_sign(typingctx, v):
    """U8x64 of v xor 0x80: int8 values q as the uint8 q + 128."""
    if v != u8x64:
        return None

    def codegen(context, builder, sig, args):
        return builder.xor(args[0], _const(_VB, 0x80))
    return u8x64(v), codegen


@intrinsic
def dot_u8_i8(typingctx, acc, u, s):
    """I32x16: acc[l] + sum over k < 4 of u[4l + k] * s[4l + k], u taken as unsigned bytes and s as
    signed (exact: no saturation). One vpdpbusd where the target has AVX-512 VNNI; elsewhere
    widening multiplies that LLVM turns into pmaddwd."""
    if not (acc == i32x16 and u == u8x64 and s == u8x64):
        return None

    def codegen(context, builder, sig, args):
        acc, u, s = args
        if _VNNI:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VI, [_VI, _VI, _VI]),
                                                "llvm.x86.avx512.vpdpbusd.512")
            return builder.call(fn, [acc, builder.bitcast(u, _VI), builder.bitcast(s, _VI)])
        wide = ir.VectorType(_I32, 4 * LANES)
        products = builder.mul(builder.zext(u, wide), builder.sext(s, wide))
        for k in range(4):
            acc = builder.add(acc, builder.shuffle_vector(products, products, _indices(range(k, 64, 4))))
        return acc
    return i32x16(acc, u, s), codegen


@intrinsic
def prefetch(typingctx, a, i):
    """Ask for the cache line holding byte a[i] (a: uint8 1-D) ahead of its use; a hint, which cannot
    fault, so i may lie past the end."""
    if not (_is_array(a, types.uint8) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        ptr = builder.gep(data, [context.cast(builder, args[1], sig.args[1], types.intp)])
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [data.type, _I32, _I32, _I32]), "llvm.prefetch.p0")
        builder.call(fn, [ptr, _const(_I32, 0), _const(_I32, 3), _const(_I32, 1)])  # read, to L1 (prefetcht0), data
        return context.get_dummy_value()
    return types.none(a, i), codegen


@intrinsic
def load_i32(typingctx, a, i):
    """I32x16 of a[i:i+16] (a: int32 1-D, i an element index)."""
    if not (_is_array(a, types.int32) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return _load(builder, _element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1]),
                     _I32, LANES)
    return i32x16(a, i), codegen


@intrinsic
def halves(typingctx, a, b):
    """A vector whose lanes 0-7 are a and 8-15 are b: F32x16 of float scalars (one scale per block of
    a U8x64 dot), I32x16 of integers (the sub-block scales of K-quants with sub-blocks of 32)."""
    if isinstance(a, types.Float) and isinstance(b, types.Float):
        ret, lane, vector = f32x16, types.float32, _VF
    elif isinstance(a, types.Integer) and isinstance(b, types.Integer):
        ret, lane, vector = i32x16, types.int32, _VI
    else:
        return None

    def codegen(context, builder, sig, args):
        a = _splat(builder, context.cast(builder, args[0], sig.args[0], lane), vector)
        b = _splat(builder, context.cast(builder, args[1], sig.args[1], lane), vector)
        return builder.shuffle_vector(a, b, _indices([*range(8), *range(24, 32)]))
    return ret(a, b), codegen


@intrinsic
def int_zeros(typingctx):
    """I32x16 of zeros."""
    def codegen(context, builder, sig, args):
        return _const(_VI, 0)
    return i32x16(), codegen


@intrinsic
def spread_i8(typingctx, a, i):
    """I32x16 whose lanes 4k to 4k+3 are the int8 a[i + k], sign-extended, for k < 4 (a: uint8 1-D): the
    sub-block scales of a U8x64 dot of K-quants with sub-blocks of 16 (Q6_K)."""
    if not (_is_array(a, types.uint8) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        four = _load(builder, _element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1]), _I8, 4)
        wide = builder.sext(four, ir.VectorType(_I32, 4))
        return builder.shuffle_vector(wide, wide, _indices([k // 4 for k in range(LANES)]))
    return i32x16(a, i), codegen


@intrinsic
def nibble_halves(typingctx, a, i):
    """U8x64 of the low nibbles of the 32 bytes a[i:i+32], then their high nibbles (a: uint8 1-D): two
    sub-blocks of 32 Q4_K / Q5_K quants."""
    if not (_is_array(a, types.uint8) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        b = _load(builder, _element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1]), _I8, 32)
        low = builder.and_(b, _const(b.type, 15))
        high = builder.lshr(b, _const(b.type, 4))
        return builder.shuffle_vector(low, high, _indices(range(64)))
    return u8x64(a, i), codegen


@intrinsic
def nibbles(typingctx, a, i, shift):
    """U8x64 of (a[i:i+64] >> shift) & 15 (a: uint8 1-D, shift 0 or 4): 64 low 4-bit parts of Q6_K quants."""
    if not (_is_array(a, types.uint8) and isinstance(i, types.Integer) and isinstance(shift, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        b = _load(builder, _element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1]), _I8, 64)
        s = _splat(builder, builder.trunc(context.cast(builder, args[2], sig.args[2], types.int32), _I8), _VB)
        return builder.and_(builder.lshr(b, s), _const(_VB, 15))
    return u8x64(a, i, shift), codegen


@intrinsic
def with_high_bits(typingctx, u, a, i, shift, step, mask):
    """U8x64 of u | (((a[i + v % 32] >> (shift + step * (v // 32))) & mask) << 4) for byte v (a: uint8
    1-D; shifts below 8): the high bits of 64 K-quant quants, kept as bit planes of 32 bytes (Q5_K: one
    bit a sub-block, step 1, mask 1; Q6_K: two bits a quarter, step 2, mask 3)."""
    if not (u == u8x64 and _is_array(a, types.uint8)
            and all(isinstance(t, types.Integer) for t in (i, shift, step, mask))):
        return None

    def codegen(context, builder, sig, args):
        b = _load(builder, _element_ptr(context, builder, sig.args[1], args[1], args[2], sig.args[2]), _I8, 32)
        s, step, mask = (builder.trunc(context.cast(builder, v, t, types.int32), _I8)
                         for v, t in zip(args[3:], sig.args[3:]))
        vty = b.type
        low = builder.lshr(b, _splat(builder, s, vty))
        high = builder.lshr(b, _splat(builder, builder.add(s, step), vty))
        bits = builder.and_(builder.shuffle_vector(low, high, _indices(range(64))), _splat(builder, mask, _VB))
        return builder.or_(args[0], builder.shl(bits, _const(_VB, 4)))
    return u8x64(u, a, i, shift, step, mask), codegen

@intrinsic
def with_fifth_bits(typingctx, u, a, i, j):
    """U8x64 of u | 16 * bit v % 32 of the little-endian uint32 at a[i] (bytes v < 32) or at a[j] (the
    rest) (a: uint8 1-D): the fifth bits of two Q5_0 / Q5_1 blocks of quants, in value order."""
    if not (u == u8x64 and _is_array(a, types.uint8)
            and isinstance(i, types.Integer) and isinstance(j, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        first = _load(builder, _element_ptr(context, builder, sig.args[1], args[1], args[2], sig.args[2]), _I8, 4)
        second = _load(builder, _element_ptr(context, builder, sig.args[1], args[1], args[3], sig.args[3]), _I8, 4)
        # byte v takes the qh byte holding its bit, then tests that bit
        spread = builder.shuffle_vector(first, second, _indices([v // 32 * 4 + v % 32 // 8 for v in range(64)]))
        bit = builder.and_(spread, ir.Constant(_VB, [1 << (v % 8) for v in range(64)]))
        high = builder.select(builder.icmp_unsigned("!=", bit, _const(_VB, 0)), _const(_VB, 16), _const(_VB, 0))
        return builder.or_(args[0], high)
    return u8x64(u, a, i, j), codegen

# ---- operators ---------------------------------------------------------------------------------

_FLOAT_OPS = {operator.add: "fadd", operator.sub: "fsub", operator.mul: "fmul"}
_INT_OPS = {operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.and_: "and_",
            operator.or_: "or_", operator.lshift: "shl", operator.rshift: "ashr"}


def _operand_kind(args):
    """(vector type, scalar class) when args are two vectors or a vector and a scalar, else None."""
    if len(args) != 2:
        return None
    vecs = [a for a in args if a in (f32x16, i32x16)]
    if not vecs or any(v != vecs[0] for v in vecs):
        return None
    scalar = types.Number if vecs[0] == f32x16 else types.Integer
    if all(a == vecs[0] or isinstance(a, scalar) for a in args):
        return vecs[0]
    return None


def _register_operator(op):
    class _Template(AbstractTemplate):
        key = op

        def generic(self, args, kws):
            vec = _operand_kind(args)
            if vec is None or (vec == f32x16 and op not in _FLOAT_OPS):
                return None
            return signature(vec, *args)

    infer_global(op)(_Template)

    def lower(context, builder, sig, args):
        vty, scalar_ty = (_VF, types.float32) if sig.return_type == f32x16 else (_VI, types.int32)
        lanes = [a if t == sig.return_type else _splat(builder, context.cast(builder, a, t, scalar_ty), vty)
                 for a, t in zip(args, sig.args)]
        if vty is _VF:
            return getattr(builder, _FLOAT_OPS[op])(*lanes, flags=tuple(sorted(FASTMATH)))
        return getattr(builder, _INT_OPS[op])(*lanes)

    for vec, scalar in ((F32x16, types.Number), (I32x16, types.Integer)):
        if vec is F32x16 and op not in _FLOAT_OPS:
            continue
        for pair in ((vec, vec), (vec, scalar), (scalar, vec)):
            lower_builtin(op, *pair)(lower)


for _op in _INT_OPS:
    _register_operator(_op)
