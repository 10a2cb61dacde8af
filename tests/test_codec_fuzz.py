"""Property-based fuzzing of the decoders of peer data (``molink.comm.codec``).

Every case must decode, or be refused with a ``pickle.UnpicklingError`` or ``ValueError``
(protobuf's ``DecodeError`` for a message that doesn't parse at all): no other exception, no
crash, no code run. Its peak traced allocation must stay within
``fuzz_corpus.allocation_bound``: ``PICKLE_ALLOC_PER_BYTE`` (64) bytes per byte of
pickle, zlib data counted at its inflated size (at most the decoders' caps), plus 4 MiB for the
interpreter's caches and a vLLM class's first use. 64 per byte because Python objects are larger
than the opcodes that make them (an empty set is 216 bytes, from one opcode byte); the codec's
pre-scan charges each opcode for what unpickling it allocates and refuses a pickle over that
budget, and real payloads are charged well within it (``test_real_payloads_fit_the_budget``).

The cases come from the fuzz corpus, ``tests/fuzz_corpus.py`` (from which ``python -m
benchmark.fuzz_decoders`` runs 10,000 per decoder): payload builders, mutations and gadgets.
Hypothesis draws the bytes and mutations here, 200 examples per test, derandomized so that every
run is the same; ``MOLINK_FUZZ_EXAMPLES=N`` runs N per test with a random seed instead.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import pickle
import tracemalloc
import zlib

import fuzz_corpus as fuzz
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from molink.comm import codec, pickle_scan
from molink.comm.proto import molink_pb2

settings.register_profile(
    "molink-fuzz",
    max_examples=int(os.environ.get("MOLINK_FUZZ_EXAMPLES", "200")),
    deadline=None,
    derandomize="MOLINK_FUZZ_EXAMPLES" not in os.environ,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile("molink-fuzz")

MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(fuzz.MUTATIONS), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)
    ),
    min_size=1,
    max_size=4,
)
OPCODE_SOUP = st.lists(
    st.sampled_from([bytes([b]) for b in fuzz.OPCODE_BYTES]) | st.binary(min_size=1, max_size=9),
    max_size=200,
).map(b"".join)
P5 = pickle.PROTO + b"\x05"


@pytest.fixture(autouse=True, scope="module")
def _quiet_vllm():
    """vLLM warns about mutated sampling parameters: not while fuzzing."""
    logger = logging.getLogger("vllm")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def check(decoder: str, data: bytes) -> fuzz.CaseResult:
    """Run ``decoder`` on ``data``: it must decode or refuse, within the allocation bound."""
    result = fuzz.run_case(decoder, data)
    assert result.outcome != "crash", f"{decoder}: {result.error}: {result.message}"
    assert result.peak <= result.bound, f"{decoder} allocated {result.peak} > {result.bound}"
    return result


# ------------------------------------------------------------------ random bytes


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data):
    for decoder in fuzz.DECODERS:
        check(decoder, data)
    check("loads", P5 + data)


@FUZZ
@given(OPCODE_SOUP)
def test_random_opcodes(body):
    check("loads", P5 + body)
    check("loads_step", zlib.compress(P5 + body))


# ------------------------------------------------------------------ mutations of valid payloads


@FUZZ
@given(st.sampled_from(sorted(fuzz.valid_pickles())), MUTATIONS)
def test_mutated_pickles(name, mutations):
    donors = list(fuzz.valid_pickles().values())
    check("loads", fuzz.mutate(fuzz.valid_pickles()[name], mutations, donors))


@FUZZ
@given(MUTATIONS, st.booleans())
def test_mutated_step_data(mutations, mutate_compressed):
    step = fuzz.valid_pickles()["step"]
    if mutate_compressed:
        data = fuzz.mutate(zlib.compress(step, 1), mutations)
    else:
        data = zlib.compress(fuzz.mutate(step, mutations, list(fuzz.valid_pickles().values())))
    check("loads_step_data", data)
    check("loads_step", data)


@FUZZ
@given(st.integers(0, len(fuzz.valid_tensor_messages()) - 1), MUTATIONS)
def test_mutated_tensor_messages(index, mutations):
    messages = fuzz.valid_tensor_messages()
    check("tensor_proto", fuzz.mutate(messages[index], mutations, messages))


@FUZZ
@given(st.integers(0, len(fuzz.valid_step_messages()) - 1), MUTATIONS, st.booleans())
def test_mutated_step_messages(index, mutations, inside):
    message = fuzz.valid_step_messages()[index]
    if inside:  # a well-formed message around a mutated step payload
        msg = molink_pb2.Step.FromString(message)
        step = fuzz.mutate(fuzz.valid_pickles()["step"], mutations)
        msg.scheduler_output = zlib.compress(step, 1)
        data = msg.SerializeToString()
    else:
        data = fuzz.mutate(message, mutations, fuzz.valid_step_messages())
    check("step_proto", data)


# ------------------------------------------------------------------ lying tensors


@FUZZ
@given(
    st.sampled_from(fuzz.TENSOR_DTYPES)
    | st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.lists(
        st.sampled_from(fuzz.SHAPE_VALUES) | st.integers(0, 64) | st.integers(-(2**63), 2**63 - 1),
        max_size=40,
    ),
    st.binary(max_size=512) | st.integers(0, 4096).map(bytes),
    st.booleans(),
)
def test_lying_tensors(dtype, shape, data, compressed):
    result = check("tensor_proto", fuzz.lying_tensor(dtype, shape, data, compressed))
    if result.outcome == "decoded":  # then it told the truth
        itemsize = codec._TORCH_DTYPES[dtype].itemsize
        assert codec._checked_numel(shape) * itemsize == len(data)


# ------------------------------------------------------------------ gadgets and valid payloads


@pytest.mark.parametrize("name", sorted(fuzz.gadgets()))
def test_gadgets_are_refused(name, monkeypatch):
    ran = []
    monkeypatch.setattr(os, "system", lambda *a: ran.append(a))
    decoder, data = fuzz.gadgets()[name]
    result = check(decoder, data)
    assert (result.outcome, result.error) == ("rejected", "PeerDataError"), result
    assert not ran


@pytest.mark.parametrize("name", sorted(fuzz.valid_pickles()))
def test_valid_payloads_decode(name):
    assert check("loads", fuzz.valid_pickles()[name]).outcome == "decoded"


def test_valid_messages_decode():
    for data in fuzz.valid_tensor_messages():
        assert check("tensor_proto", data).outcome == "decoded"
    for data in fuzz.valid_step_messages():
        assert check("step_proto", data).outcome == "decoded"
    assert check("loads_step", zlib.compress(fuzz.valid_pickles()["step"])).outcome == "decoded"


@pytest.mark.parametrize("name", sorted(fuzz.large_valid_pickles()))
def test_real_payloads_fit_the_budget(name):
    """Real payloads are charged at most 60% of the budget, and allocate less than charged."""
    data = fuzz.large_valid_pickles()[name]
    charged = pickle_scan.check_pickle_stream(data, 1 << 62, codec._GLOBAL_CALLS)
    assert charged <= 0.6 * pickle_scan.PICKLE_ALLOC_PER_BYTE * len(data), charged / len(data)
    assert check("loads", data).peak <= charged + pickle_scan.PICKLE_ALLOC_SLACK


@functools.cache
def _charge_probes() -> dict[str, bytes]:
    """Pickles made of one kind of opcode, many times: each is charged what it allocates."""
    from pickle import (
        APPENDS,
        EMPTY_DICT,
        EMPTY_LIST,
        EMPTY_SET,
        FROZENSET,
        MARK,
        MEMOIZE,
        NONE,
        SETITEMS,
        TUPLE1,
    )

    n = 10_000
    ints = b"".join(pickle.BININT + i.to_bytes(4, "little") for i in range(n))
    pairs = b"".join(pickle.BININT + i.to_bytes(4, "little") + NONE for i in range(n))
    return {
        "empty lists": fuzz.pickle_of(EMPTY_LIST, MARK, EMPTY_LIST * n, APPENDS),
        "memoized empty dicts": fuzz.pickle_of(
            EMPTY_LIST, MARK, (EMPTY_DICT + MEMOIZE) * n, APPENDS
        ),
        "empty sets": fuzz.pickle_of(EMPTY_LIST, MARK, EMPTY_SET * n, APPENDS),
        "empty frozensets": fuzz.pickle_of(EMPTY_LIST, MARK, (MARK + FROZENSET) * n, APPENDS),
        "1-tuples": fuzz.pickle_of(EMPTY_LIST, MARK, (NONE + TUPLE1) * n, APPENDS),
        "a list of ints": fuzz.pickle_of(EMPTY_LIST, MARK, ints, APPENDS),
        "a set of ints": fuzz.pickle_of(EMPTY_SET, MARK, ints, pickle.ADDITEMS),
        "a dict of ints": fuzz.pickle_of(EMPTY_DICT, MARK, pairs, SETITEMS),
        "ASCII strings": fuzz.pickle_of(EMPTY_LIST, MARK, fuzz.text("abcdefgh") * n, APPENDS),
        "4-byte characters": fuzz.pickle_of(fuzz.text("\U0001f600" * n)),
        "sampling params": codec.dumps([fuzz.sampling_params() for _ in range(200)]),
        "scheduler outputs": codec.dumps([fuzz.scheduler_output() for _ in range(50)]),
        "tensors and arrays": codec.dumps([fuzz.model_runner_output(4) for _ in range(100)]),
    }


@pytest.mark.parametrize("name", sorted(_charge_probes()))
def test_prescan_charges_cover_allocation(name):
    """What the pre-scan charges bounds what it and the unpickler allocate (each on its own)."""
    data = _charge_probes()[name]
    charged = pickle_scan.check_pickle_stream(data, 1 << 62, codec._GLOBAL_CALLS)
    for step in (
        lambda: pickle_scan.check_pickle_stream(data, 1 << 62, codec._GLOBAL_CALLS),
        lambda: codec.RestrictedUnpickler(io.BytesIO(data)).load(),
    ):
        tracemalloc.start()
        try:
            step()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak <= charged, f"{peak} > {charged}"


# ------------------------------------------------------------------------ announcements
_JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
_VALID_ANNOUNCEMENT = {
    "peer_id": "12D3KooWCMEMThjBZ9EQ69Aa6spGBqrmCzNtcpFXk6wXZSYPfrrG",
    "model_name": "m",
    "model_hash": "h",
    "num_layers": 30,
    "start_layer": 15,
    "end_layer": 29,
    "grpc_address": "10.0.0.2:50051",
    "state": "online",
    "version": "0.2.0",
    "kv_capacity_bytes": 1 << 30,
    "is_head": False,
    "throughput": 12.5,
    "node_key": "ssh-rsa AAAA",
}


@FUZZ
@given(
    st.one_of(
        _JSONISH,
        st.dictionaries(st.sampled_from(sorted(_VALID_ANNOUNCEMENT)), _JSONISH).map(
            lambda changes: {**_VALID_ANNOUNCEMENT, **changes}
        ),
    )
)
def test_announcement_decoder_accepts_or_refuses_cleanly(value):
    """``NodeAnnouncement.from_dict`` (what a DHT entry from a peer goes through)."""
    from molink.comm.announcement import InvalidAnnouncement, NodeAnnouncement

    try:
        ann = NodeAnnouncement.from_dict(value)
    except InvalidAnnouncement:
        return
    except ValueError:  # the address parser's own errors
        return
    assert 0 <= ann.start_layer <= ann.end_layer < ann.num_layers
