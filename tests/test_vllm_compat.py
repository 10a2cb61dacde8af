"""Contracts with vLLM's internals, and a guard that only ``molink.vllm_compat`` touches them.

Each entry of :data:`molink.vllm_compat.INTERNALS` has one contract check here
(``test_vllm_contract[<symbol>]``): it fails naming the vLLM symbol, the vllm_compat function
that relies on it and what MoLink needs from it. Run these first when moving to a new vLLM
(``docs/upgrading-vllm.md``)::

    python -m pytest -n 0 tests/test_vllm_compat.py

The guard tests parse every module of ``molink`` outside ``molink/vllm_compat`` (with
:mod:`ast`) for private vLLM imports, the private vLLM names vllm_compat owns, and assignments to
attributes of vLLM classes, modules and objects (monkey-patching).
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import enum
import importlib
import importlib.util
import inspect
import re
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from molink import vllm_compat
from molink.vllm_compat import INTERNALS, PATCHED_ATTRIBUTES, PRIVATE_NAMES, Internal

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "molink"
COMPAT = PACKAGE / "vllm_compat"

# ---------------------------------------------------------------------------------- helpers


def _source(obj: Any) -> str:
    return textwrap.dedent(inspect.getsource(obj))


def _vllm_mro(cls: type) -> list[type]:
    return [c for c in cls.__mro__ if c.__module__.split(".")[0] == "vllm"]


def _assigns(cls: type, attr: str) -> bool:
    """Whether some vLLM class of ``cls``'s MRO assigns ``self.<attr>`` in its code."""
    pattern = re.compile(rf"self\.{re.escape(attr)}\s*(:[^=\n]+)?=[^=]")
    return any(pattern.search(_source(c)) for c in _vllm_mro(cls))


def _reads(func: Any, expression: str) -> bool:
    return re.search(rf"{re.escape(expression)}\b", _source(func)) is not None


def _params(func: Any) -> list[str]:
    return list(inspect.signature(func).parameters)


def _require(condition: Any, what: str) -> None:
    if not condition:
        raise AssertionError(what)


CONTRACTS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {}


def contract(
    symbol: str,
) -> Callable[[Callable[[pytest.MonkeyPatch], None]], Callable[[pytest.MonkeyPatch], None]]:
    def register(check: Callable[[pytest.MonkeyPatch], None]) -> Callable:
        assert symbol not in CONTRACTS, symbol
        CONTRACTS[symbol] = check
        return check

    return register


# ---------------------------------------------------------------------------- engine config


@contract("vllm.config.VllmConfig.max_concurrent_batches")
def _batch_queue_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.config import VllmConfig
    from vllm.v1.engine.core import EngineCore

    from molink.stage_spec import ADDITIONAL_CONFIG_KEY
    from molink.vllm_compat import engine_config

    prop = inspect.getattr_static(VllmConfig, "max_concurrent_batches")
    _require(isinstance(prop, property), "VllmConfig.max_concurrent_batches is no property")
    _require(
        _reads(EngineCore.__init__, "vllm_config.max_concurrent_batches"),
        "EngineCore.__init__ no longer reads vllm_config.max_concurrent_batches",
    )
    monkeypatch.setattr(VllmConfig, "max_concurrent_batches", prop)  # restored afterwards
    engine_config.install_batch_queue_bound()
    vllm_like = SimpleNamespace(
        additional_config={ADDITIONAL_CONFIG_KEY: {"max_micro_batches": 5}},
        parallel_config=SimpleNamespace(pipeline_parallel_size=2),
        scheduler_config=SimpleNamespace(async_scheduling=False),
        use_v2_model_runner=False,
    )
    new = inspect.getattr_static(VllmConfig, "max_concurrent_batches")
    _require(new.fget(vllm_like) == 5, "the bound is not MoLink's max_micro_batches")
    vllm_like.additional_config = None
    _require(new.fget(vllm_like) == 2, "without MoLink's bound it is not vLLM's (pp size)")


# ----------------------------------------------------------------------------- scheduler


@contract("vllm.v1.core.sched.scheduler.Scheduler._make_cached_request_data")
def _make_cached_request_data(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.core.sched.output import CachedRequestData
    from vllm.v1.core.sched.scheduler import Scheduler

    params = _params(Scheduler._make_cached_request_data)
    expected = [
        "self",
        "running_reqs",
        "resumed_reqs",
        "num_scheduled_tokens",
        "spec_decode_tokens",
        "req_to_new_blocks",
    ]
    _require(params == expected, f"parameters are {params}, not {expected}")
    _require(
        _reads(Scheduler.schedule, "self._make_cached_request_data"),
        "Scheduler.schedule no longer calls it",
    )
    fields = {f.name for f in dataclasses.fields(CachedRequestData)}
    _require("all_token_ids" in fields, "CachedRequestData has no all_token_ids field")


@contract("vllm.v1.core.sched.scheduler.Scheduler._preempt_request")
def _preempt_request(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    params = _params(Scheduler._preempt_request)
    _require(params[:2] == ["self", "request"], f"parameters are {params}")
    _require(_reads(Scheduler.schedule, "self._preempt_request"), "schedule() doesn't call it")
    _require(
        _reads(Scheduler.reset_prefix_cache, "self._preempt_request")
        or "reset_running_requests" in _params(Scheduler.reset_prefix_cache),
        "reset_prefix_cache(reset_running_requests=True) doesn't preempt through it",
    )


@contract("vllm.v1.core.sched.scheduler.Scheduler._free_request")
def _free_request(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    params = _params(Scheduler._free_request)
    _require(params[:2] == ["self", "request"], f"parameters are {params}")
    _require(
        _reads(Scheduler.finish_requests, "self._free_request"),
        "finish_requests no longer frees through it",
    )
    _require(
        _source(Scheduler).count("self._free_request(") >= 2,
        "finished requests (stopped ones in update_from_output) no longer go through it",
    )


@contract("vllm.v1.core.sched.scheduler.Scheduler._pause_state")
def _pause_state(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.core.sched.interface import PauseState
    from vllm.v1.core.sched.scheduler import Scheduler

    _require(_assigns(Scheduler, "_pause_state"), "Scheduler no longer sets self._pause_state")
    _require(_reads(Scheduler.schedule, "self._pause_state"), "schedule() doesn't read it")
    _require(hasattr(PauseState, "PAUSED_ALL"), "PauseState.PAUSED_ALL is gone")


@contract("vllm.v1.core.sched.scheduler.Scheduler.running")
def _running(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    for attr in (
        "running",
        "max_num_scheduled_tokens",
        "max_num_running_reqs",
        "max_num_active_reqs",
    ):
        _require(_assigns(Scheduler, attr), f"Scheduler no longer sets self.{attr}")
        _require(_reads(Scheduler.schedule, f"self.{attr}"), f"schedule() doesn't read {attr}")


@contract("vllm.v1.core.block_pool.BlockPool.blocks")
def _block_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler

    from molink.vllm_compat.scheduler import SchedulerHooks

    _require(_assigns(Scheduler, "kv_cache_manager"), "Scheduler has no kv_cache_manager")
    _require(_assigns(KVCacheManager, "block_pool"), "KVCacheManager has no block_pool")
    pool = BlockPool(num_gpu_blocks=10, enable_caching=True, hash_block_size=16)
    _require([b.block_id for b in pool.blocks] == list(range(10)), "blocks[i] is not block i")
    scheduler = SimpleNamespace(
        kv_cache_manager=SimpleNamespace(block_pool=pool), cache_config=SimpleNamespace()
    )
    held = pool.get_new_blocks(9)  # every block but the null block
    _require(not SchedulerHooks.retire_kv_blocks(scheduler, 6), "retired blocks in use")
    _require(pool.num_gpu_blocks == 10, "a refused retirement changed the pool")
    pool.free_blocks(held)
    _require(SchedulerHooks.retire_kv_blocks(scheduler, 6), "couldn't retire free blocks")
    _require(pool.get_num_free_blocks() == 5, "the retired blocks are still free")
    _require(pool.get_usage() == 0.0, "usage doesn't count the smaller pool")
    _require(pool.reset_prefix_cache(), "reset_prefix_cache counts retired blocks as used")
    handed = pool.get_new_blocks(5)
    _require(max(b.block_id for b in handed) == 5, "a retired block was handed out")
    _require(scheduler.cache_config.num_gpu_blocks == 6, "cache_config not updated")
    pool.free_blocks(handed)
    SchedulerHooks.grow_kv_blocks(scheduler, 10)
    _require(pool.get_num_free_blocks() == 9, "the blocks grown back are not free")
    got = sorted(b.block_id for b in pool.get_new_blocks(9))
    _require(got == list(range(1, 10)), f"grown back, the pool hands out blocks {got}")
    _require(pool.get_usage() == 1.0, "usage doesn't count the grown pool")
    _require(scheduler.cache_config.num_gpu_blocks == 10, "cache_config not updated on growth")


@contract("vllm.v1.request.Request.num_in_flight_tokens")
def _in_flight_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request

    _require(_assigns(Request, "num_in_flight_tokens"), "Request has no num_in_flight_tokens")
    after = _source(Scheduler._update_after_schedule)
    _require("request.num_computed_tokens += num_scheduled_token" in after, "not counted")
    _require("request.num_in_flight_tokens += num_scheduled_token" in after, "not counted")
    _require(
        "request.num_in_flight_tokens -= num_tokens_scheduled"
        in _source(Scheduler.update_from_output),
        "update_from_output doesn't take a step's tokens off num_in_flight_tokens",
    )


@contract("vllm.v1.core.sched.scheduler.Scheduler.prev_step_scheduled_req_ids")
def _roll_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request

    for attr in ("num_stale_output_tokens", "drop_stale_output", "spec_token_ids"):
        _require(_assigns(Request, attr), f"Request has no {attr}")
    preempt = _source(Scheduler._preempt_request)
    _require("request.num_stale_output_tokens = request.num_in_flight_tokens" in preempt, "stale")
    update = _source(Scheduler.update_from_output)
    _require(
        "if output_is_stale and request.drop_stale_output:" in update,
        "update_from_output no longer drops a stale output under drop_stale_output",
    )
    _require("request.num_stale_output_tokens -= num_tokens_scheduled" in update, "not drained")
    _require(_assigns(Scheduler, "prev_step_scheduled_req_ids"), "prev_step_scheduled_req_ids")
    _require(_params(KVCacheManager.evict_blocks)[:2] == ["self", "block_ids"], "evict_blocks")
    _require(
        _reads(BlockPool.evict_blocks, "self._maybe_evict_cached_block"),
        "BlockPool.evict_blocks no longer drops a block's hash from the prefix cache",
    )


@contract("vllm.v1.worker.gpu_model_runner.GPUModelRunner._update_states")
def _resumed(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    update = _source(GPUModelRunner._update_states)
    _require("req_id in req_data.resumed_req_ids" in update, "resumed requests not told apart")
    _require("req_state.block_ids = new_block_ids" in update, "resumed block ids not replaced")
    _require("reqs_to_add.append(req_state)" in update, "a request outside the batch not added")


@contract("vllm.v1.worker.gpu_input_batch.InputBatch.req_ids")
def _row_order(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.worker.gpu_input_batch import InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _require(isinstance(inspect.getattr_static(InputBatch, "req_ids"), property), "req_ids")
    prepare = _source(GPUModelRunner._prepare_inputs)
    _require(
        "self.input_batch.req_ids" in prepare or "input_batch.req_ids" in prepare,
        "_prepare_inputs no longer orders rows by input_batch.req_ids",
    )


@contract("vllm.v1.engine.detokenizer.FastIncrementalDetokenizer.__init__")
def _fast_detokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from vllm import SamplingParams
    from vllm.v1.engine.detokenizer import FastIncrementalDetokenizer

    from molink.vllm_compat.detokenizer import fix_prompt_tail_detokenization

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    raw.train_from_iterator(
        ["the quick brown fox"] * 8, trainers.BpeTrainer(initial_alphabet=alphabet)
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw)
    ids = raw.encode("the fox \u00e9 fox").ids  # "é" is two byte tokens
    cut = next(i for i in range(len(ids)) if raw.decode(ids[:i]).endswith("\ufffd"))
    fix_prompt_tail_detokenization()
    request = SimpleNamespace(
        request_id="r", prompt_token_ids=ids[:cut], sampling_params=SamplingParams()
    )
    detokenizer = FastIncrementalDetokenizer(tokenizer, request)  # the prompt ends mid-"é"
    for token_id in ids[cut:]:
        detokenizer.update([token_id], False)
    # vLLM alone gives "the fox é fox": the prompt's text again, then the new text.
    _require(
        detokenizer.output_text == "\u00e9 fox",
        f"a prompt ending mid-character gives {detokenizer.output_text!r}, not 'é fox'",
    )


# ------------------------------------------------------------------------------ executor


@contract("vllm.v1.utils.kill_process_tree")
def _kill_process_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    import inspect
    import subprocess

    import psutil
    import vllm.v1.utils as v1_utils
    from vllm.utils.system_utils import kill_process_tree

    from molink.vllm_compat.shutdown import tolerate_vanishing_children

    _require(
        "kill_process_tree(" in inspect.getsource(v1_utils.shutdown),
        "vllm.v1.utils.shutdown no longer calls kill_process_tree",
    )
    gone = subprocess.Popen(["true"])
    vanished = psutil.Process(gone.pid)  # listed as a child, then exits and is reaped
    gone.wait()
    monkeypatch.setattr(psutil.Process, "children", lambda self, recursive=False: [vanished])
    target = subprocess.Popen(["sleep", "60"])
    try:
        try:
            kill_process_tree(target.pid)
            raised = False
        except psutil.NoSuchProcess:
            raised = True
        _require(raised, "vLLM's own kill_process_tree skips vanished children: drop the patch")
        _require(target.poll() is None, "vLLM's kill went on past the vanished child")
        monkeypatch.setattr(v1_utils, "kill_process_tree", v1_utils.kill_process_tree)
        tolerate_vanishing_children()
        v1_utils.kill_process_tree(target.pid)
        _require(target.wait(timeout=10) == -9, "the patched kill did not kill the process")
    finally:
        target.kill()
        target.wait()


@contract("vllm.v1.executor.abstract.Executor._init_executor")
def _init_executor(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.executor.abstract import Executor

    from molink.vllm_compat.executor import ExecutorHooks

    _require("_init_executor" in Executor.__abstractmethods__, "no longer abstract")
    _require(_reads(Executor.__init__, "self._init_executor"), "Executor.__init__ doesn't call it")
    _require(
        _source(Executor.__init__).index("self.vllm_config")
        < _source(Executor.__init__).index("self._init_executor"),
        "Executor.__init__ calls it before setting vllm_config",
    )
    _require("_init_executor" not in ExecutorHooks.__abstractmethods__, "hook not installed")


@contract("vllm.engine.protocol.EngineClient.collective_rpc")
def _collective_rpc(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.engine.protocol import EngineClient
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.executor.abstract import Executor

    from molink.vllm_compat.executor import call_executor

    for cls in (EngineClient, AsyncLLM):
        params = _params(cls.collective_rpc)
        _require(params[:2] == ["self", "method"], f"{cls.__name__}.collective_rpc: {params}")
    _require(
        _reads(EngineCore.collective_rpc, "self.model_executor.collective_rpc"),
        "EngineCore.collective_rpc no longer calls the executor's",
    )
    params = _params(Executor.collective_rpc)
    _require(
        params[:5] == ["self", "method", "timeout", "args", "kwargs"],
        f"Executor.collective_rpc: {params}",
    )

    class Engine:
        async def collective_rpc(self, method: str) -> list[str]:
            return [f"answer to {method}"]

    _require(asyncio.run(call_executor(Engine(), "m")) == "answer to m", "call_executor is broken")


# ------------------------------------------------------------------------------ KV cache


@contract("vllm.config.CacheConfig.num_gpu_blocks_override")
def _num_gpu_blocks_override(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.config import CacheConfig
    from vllm.v1.core import kv_cache_utils

    _require(
        "num_gpu_blocks_override" in {f.name for f in dataclasses.fields(CacheConfig)},
        "CacheConfig has no num_gpu_blocks_override field",
    )
    _require(
        "cache_config.num_gpu_blocks_override" in _source(kv_cache_utils),
        "the KV cache planner no longer reads cache_config.num_gpu_blocks_override",
    )
    params = _params(kv_cache_utils.get_kv_cache_configs)
    _require(params[:3] == ["vllm_config", "kv_cache_specs", "available_memory"], str(params))


@contract("vllm.v1.core.kv_cache_utils.get_kv_cache_config_from_groups")
def _kv_cache_config_from_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.core import kv_cache_utils

    params = _params(kv_cache_utils.get_kv_cache_config_from_groups)
    _require(params[:3] == ["vllm_config", "kv_cache_groups", "available_memory"], str(params))
    planner = _source(kv_cache_utils.get_kv_cache_configs)
    _require(
        "_project_kv_cache_groups_to_worker" in planner
        and "get_kv_cache_config_from_groups(" in planner,
        "get_kv_cache_configs no longer plans each stage from the global groups projected onto "
        "its layers (plan_stage_kv_cache must do what it does now)",
    )


@contract("vllm.config.CacheConfig.mamba_cache_mode")
def _mamba_cache_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.config import CacheConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.worker import mamba_utils

    _require(
        "mamba_cache_mode" in {f.name for f in dataclasses.fields(CacheConfig)},
        "CacheConfig has no mamba_cache_mode field",
    )
    runner = _source(_runner_class().execute_model)
    _require(
        'self.cache_config.mamba_cache_mode == "align"' in runner and "preprocess_mamba" in runner,
        'execute_model no longer reads cache_config.mamba_cache_mode == "align" each step to '
        "preprocess Mamba state",
    )
    try:
        mamba_utils.get_mamba_groups(KVCacheConfig(1, [], []))
    except AssertionError:
        return
    raise AssertionError("get_mamba_groups accepts a plan without Mamba layers now: drop the skip")


@contract("vllm.config.CacheConfig.mamba_block_size")
def _mamba_block_size(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.config import CacheConfig
    from vllm.model_executor.layers.mamba.abstract import MambaBase
    from vllm.platforms.interface import Platform

    _require(
        "mamba_block_size" in {f.name for f in dataclasses.fields(CacheConfig)},
        "CacheConfig has no mamba_block_size field",
    )
    _require(
        "block_size=mamba_block_size" in _source(MambaBase.get_kv_cache_spec)
        and "cache_config.mamba_block_size" in _source(MambaBase.get_kv_cache_spec),
        "a Mamba layer's MambaSpec no longer takes cache_config.mamba_block_size as its block size",
    )
    _require(
        "cache_config.mamba_block_size = cache_config.block_size"
        in _source(Platform.update_block_size_for_backend)
        + _source(Platform._align_hybrid_block_size),
        'vLLM no longer makes mamba_block_size equal to block_size in "align" mode',
    )


@contract("vllm.v1.worker.utils.allocate_kv_cache")
def _allocate_kv_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.worker import utils

    _require(
        "must share one backing allocation" in _source(utils.allocate_kv_cache),
        "allocate_kv_cache no longer backs every KVCacheTensor of a plan with one allocation "
        "of tensor.size bytes (kv_cache_bytes must count what it allocates now)",
    )


@contract("vllm.v1.kv_cache_interface.KVCacheConfig.kv_cache_layout")
def _kv_cache_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.config import CacheConfig
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.kv_cache_interface import KVCacheConfig

    from molink.vllm_compat.kv_cache import stamp_kv_cache_layout

    _require(
        "kv_cache_layout" in {f.name for f in dataclasses.fields(KVCacheConfig)},
        "KVCacheConfig has no kv_cache_layout field",
    )
    _require(hasattr(CacheConfig, "kv_cache_layout"), "CacheConfig has no kv_cache_layout")
    _require(
        "kv_cache_config.kv_cache_layout = vllm_config.cache_config.kv_cache_layout"
        in _source(EngineCore),
        "EngineCore no longer stamps cache_config.kv_cache_layout on each stage's plan "
        "(copy what it does now into kv_cache.stamp_kv_cache_layout)",
    )
    config = KVCacheConfig(num_blocks=1, kv_cache_tensors=[], kv_cache_groups=[])
    _require(stamp_kv_cache_layout(config, "NHD").kv_cache_layout == "NHD", "not stamped")


# ---------------------------------------------------------------------------- model runner


def _runner_class() -> type:
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _require(issubclass(CPUModelRunner, GPUModelRunner), "CPUModelRunner left GPUModelRunner")
    return CPUModelRunner


@contract("vllm.v1.worker.gpu_model_runner.GPUModelRunner.intermediate_tensors")
def _intermediate_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = _runner_class()
    for attr in ("intermediate_tensors", "max_num_tokens", "model_config", "device"):
        _require(_assigns(runner, attr), f"the model runner no longer sets self.{attr}")
    source = "".join(_source(c) for c in _vllm_mro(runner))
    _require(
        re.search(
            r"self\.model\.make_empty_intermediate_tensors\(\s*batch_size=.*?,\s*dtype=.*?,"
            r"\s*device=",
            source,
            re.S,
        ),
        "the runner no longer builds its buffer with model.make_empty_intermediate_tensors("
        "batch_size, dtype, device)",
    )
    _require("self.intermediate_tensors is None" in source, "the buffer is no longer None at first")


def _fake_runner() -> SimpleNamespace:
    return SimpleNamespace(
        device=torch.device("cpu"),
        kv_cache_config=SimpleNamespace(kv_cache_groups=[object(), object()]),
        requests={},
        uses_mrope=False,
    )


@contract("vllm.v1.worker.gpu_input_batch.CachedRequestState")
def _cached_request_state(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.worker.gpu_input_batch import CachedRequestState

    from molink.vllm_compat.model_runner import INSTALLED_REQUEST_FIELDS, install_request_state

    fields = {f.name: f for f in dataclasses.fields(CachedRequestState)}
    missing = set(INSTALLED_REQUEST_FIELDS) - set(fields)
    _require(not missing, f"fields gone: {sorted(missing)}")
    required = {
        name
        for name, f in fields.items()
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    new = required - set(INSTALLED_REQUEST_FIELDS)
    _require(not new, f"new required fields MoLink doesn't set: {sorted(new)}")
    runner = _fake_runner()
    install_request_state(
        runner,
        "r1",
        prompt_token_ids=[1, 2, 3],
        prompt_embeds=None,
        prompt_is_token_ids=None,
        sampling_params=SamplingParams(seed=7, max_tokens=4),
        pooling_params=None,
        lora_request=None,
        output_token_ids=[4],
    )
    state = runner.requests["r1"]
    _require(isinstance(state, CachedRequestState), "no CachedRequestState installed")
    _require(state.num_tokens == 4 and state.block_ids == ([], []), "wrong state installed")
    _require(state.generator is not None, "a seeded request got no generator")


@contract("vllm.v1.worker.gpu_model_runner.GPUModelRunner._init_mrope_positions")
def _init_mrope_positions(monkeypatch: pytest.MonkeyPatch) -> None:
    from molink.vllm_compat.model_runner import install_request_state

    runner = _runner_class()
    params = _params(runner._init_mrope_positions)
    _require(params == ["self", "req_state"], f"parameters are {params}")
    _require(_assigns(runner, "uses_mrope"), "the runner no longer sets self.uses_mrope")
    fake = _fake_runner()
    fake.uses_mrope = True
    seen: list[Any] = []
    fake._init_mrope_positions = seen.append
    install_request_state(
        fake,
        "r",
        prompt_token_ids=[1],
        prompt_embeds=None,
        prompt_is_token_ids=None,
        sampling_params=None,
        pooling_params=None,
        lora_request=None,
        output_token_ids=[],
    )
    _require(seen == [fake.requests["r"]], "M-RoPE positions not initialized")


@contract("vllm.v1.worker.gpu_model_runner.GPUModelRunner._may_reorder_batch")
def _rows_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.worker.gpu_input_batch import InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from molink.vllm_compat.model_runner import rows_in_order

    update = _source(GPUModelRunner._update_states)
    at = [update.find(s) for s in ("condense()", "_may_reorder_batch(", "refresh_metadata()")]
    _require(-1 not in at and at == sorted(at), "_may_reorder_batch moved in _update_states")
    _require(_params(InputBatch.swap_states) == ["self", "i1", "i2"], "swap_states changed")

    class Batch:  # swaps rows as InputBatch.swap_states does
        def __init__(self, ids: list[str]) -> None:
            self.ids = ids
            self.req_id_to_index = {r: i for i, r in enumerate(ids)}

        def swap_states(self, i1: int, i2: int) -> None:
            self.ids[i1], self.ids[i2] = self.ids[i2], self.ids[i1]
            self.req_id_to_index = {r: i for i, r in enumerate(self.ids)}

    runner = SimpleNamespace(input_batch=Batch(["a", "b", "c", "d"]), _may_reorder_batch=None)
    runner._may_reorder_batch = lambda so: None
    with rows_in_order(runner, ["d", "b", "a", "c"]):
        runner._may_reorder_batch(None)
    _require(runner.input_batch.ids == ["d", "b", "a", "c"], "rows not put in order")
    with rows_in_order(runner, ["x"]), pytest.raises(ValueError):
        runner._may_reorder_batch(None)


@contract("vllm.v1.worker.gpu_model_runner.GPUModelRunner.reorder_batch_threshold")
def _reorder_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = _runner_class()
    _require(_assigns(runner, "reorder_batch_threshold"), "the runner no longer sets it")
    _require(
        _reads(runner._may_reorder_batch, "self.reorder_batch_threshold is not None"),
        "_may_reorder_batch no longer reorders only with a threshold",
    )


@contract("vllm.v1.worker.gpu_model_runner.GPUModelRunner.max_num_tokens")
def _step_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = _runner_class()
    for attr in ("max_num_tokens", "max_num_reqs"):
        _require(_assigns(runner, attr), f"the runner no longer sets self.{attr}")


@contract("vllm.v1.core.sched.output.SchedulerOutput (fields)")
def _step_joining(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    import numpy as np
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput
    from vllm.v1.outputs import LogprobsLists, ModelRunnerOutput

    from molink.vllm_compat.step_joining import (
        JOINED_FIELDS,
        SPLIT_FIELDS,
        can_join,
        join_steps,
        split_output,
    )

    names = {f.name for f in dataclasses.fields(CachedRequestData)}
    expected = {"req_ids", "resumed_req_ids", "new_token_ids", "all_token_ids", "new_block_ids"}
    expected |= {"num_computed_tokens", "num_output_tokens"}
    _require(names == expected, f"CachedRequestData has fields {sorted(names ^ expected)}")
    fields = {f.name for f in dataclasses.fields(SchedulerOutput)}
    _require(fields >= JOINED_FIELDS, f"SchedulerOutput lacks {sorted(JOINED_FIELDS - fields)}")
    fields = {f.name for f in dataclasses.fields(ModelRunnerOutput)}
    _require(fields >= SPLIT_FIELDS, f"ModelRunnerOutput lacks {sorted(SPLIT_FIELDS - fields)}")

    def step(req: str, tokens: int) -> SchedulerOutput:
        so = SchedulerOutput.make_empty()
        so.scheduled_cached_reqs = CachedRequestData(
            req_ids=[req],
            resumed_req_ids=set(),
            new_token_ids=[[]],
            all_token_ids={},
            new_block_ids=[None],
            num_computed_tokens=[5],
            num_output_tokens=[1],
        )
        so.num_scheduled_tokens = {req: tokens}
        so.total_num_scheduled_tokens = tokens
        so.finished_req_ids = {f"{req}-done"}
        so.num_common_prefix_blocks = [2]
        return so

    a, b = step("a", 1), step("b", 3)
    _require(can_join(a) and not can_join(SchedulerOutput.make_empty()), "can_join")
    joined = join_steps([a, b])
    _require(joined.scheduled_cached_reqs.req_ids == ["a", "b"], "cached requests not joined")
    _require(joined.total_num_scheduled_tokens == 4, "token counts not joined")
    _require(joined.finished_req_ids == {"a-done", "b-done"}, "finished requests not joined")
    _require(joined.num_common_prefix_blocks == [0], "a common prefix across heads")
    out = ModelRunnerOutput(
        req_ids=["a", "b"],
        req_id_to_index={"a": 0, "b": 1},
        sampled_token_ids=[[7], [8]],
        logprobs=LogprobsLists(np.array([[1], [2]]), np.array([[0.1], [0.2]]), np.array([0, 1])),
        prompt_logprobs_dict={"b": None},
    )
    first, second = split_output(out, [["a"], ["b"]])
    _require(second.req_ids == ["b"] and second.req_id_to_index == {"b": 0}, "split ids")
    _require(second.sampled_token_ids == [[8]] and second.prompt_logprobs_dict == {"b": None}, "")
    _require(first.logprobs.logprob_token_ids.tolist() == [[1]], "logprobs not split")


@contract("vllm.v1.worker.gpu_model_runner.GPUModelRunner.execute_model_state")
def _execute_model_state(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.core.sched.output import SchedulerOutput

    from molink.vllm_compat.model_runner import reset_model_runner

    runner = _runner_class()
    _require(_assigns(runner, "execute_model_state"), "the runner no longer sets it")
    _require(
        _reads(runner.execute_model, "self.execute_model_state is not None"),
        "execute_model no longer checks it",
    )
    ran: list[SchedulerOutput] = []
    fake = SimpleNamespace(
        execute_model_state="pending", requests={"a": 1}, execute_model=ran.append
    )
    reset_model_runner(fake, ["a"])
    _require(fake.execute_model_state is None, "state not cleared")
    _require(ran[0].finished_req_ids == {"a"} and ran[0].total_num_scheduled_tokens == 0, "reset")
    reset_model_runner(fake, [])
    _require(len(ran) == 1, "an empty reset ran a step")


# ---------------------------------------------------------------------------------- worker


@contract("vllm.platforms.*.check_and_update_config worker_cls")
def _platform_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.platforms import current_platform

    from molink.vllm_compat.worker import (
        PLATFORM_MODULES,
        PLATFORM_WORKERS,
        platform_worker_class,
    )

    _require(set(PLATFORM_MODULES) == set(PLATFORM_WORKERS), "PLATFORM_MODULES incomplete")
    for device, qualname in PLATFORM_WORKERS.items():
        for module in PLATFORM_MODULES[device]:
            spec = importlib.util.find_spec(module)
            origin = spec.origin if spec is not None else None
            _require(origin, f"{module} is gone")
            text = Path(str(origin)).read_text(encoding="utf-8")
            _require(
                f'worker_cls = "{qualname}"' in text,
                f"{module} no longer picks {qualname} for {device}",
            )
    worker = platform_worker_class()
    _require(
        f"{worker.__module__}.{worker.__qualname__}"
        == PLATFORM_WORKERS[current_platform.device_type],
        "this platform's worker doesn't resolve",
    )


@contract("vllm.envs.VLLM_USE_V2_MODEL_RUNNER")
def _use_v2_model_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    import vllm.envs as envs

    from molink.vllm_compat.worker import use_v1_model_runner

    _require("VLLM_USE_V2_MODEL_RUNNER" in envs.environment_variables, "vLLM dropped it")
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    use_v1_model_runner()
    _require(not envs.environment_variables["VLLM_USE_V2_MODEL_RUNNER"](), "'0' isn't V1")


# -------------------------------------------------------------------------- parallel state


@contract("vllm.distributed.parallel_state._PP")
def _pp_global(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.distributed import parallel_state

    from molink.vllm_compat.parallel_state import StagePipelineGroup, replace_pp_group

    _require("_PP" in vars(parallel_state), "vllm.distributed.parallel_state._PP is gone")
    _require(_reads(parallel_state.get_pp_group, "return _PP"), "get_pp_group doesn't return _PP")
    monkeypatch.setattr(parallel_state, "_PP", parallel_state._PP)  # restored afterwards
    group = StagePipelineGroup(1, 3)
    replace_pp_group(group)
    _require(parallel_state.get_pp_group() is group, "get_pp_group() doesn't see the group")


@contract("vllm.distributed.parallel_state.GroupCoordinator")
def _group_coordinator(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.distributed.parallel_state import GroupCoordinator

    from molink.vllm_compat.parallel_state import PP_GROUP_MEMBERS, StagePipelineGroup

    for member in PP_GROUP_MEMBERS:
        _require(
            hasattr(GroupCoordinator, member) or _assigns(GroupCoordinator, member),
            f"GroupCoordinator.{member} is gone",
        )
    group = StagePipelineGroup(2, 3)
    for member in PP_GROUP_MEMBERS:
        getattr(group, member)
    _require(group.is_last_rank and not group.is_first_rank and group.next_rank == 0, "ranks")
    with pytest.raises(RuntimeError, match="not available"):
        group.send_tensor_dict  # noqa: B018  # a collective fails loudly


@contract("vllm.envs.VLLM_PP_LAYER_PARTITION")
def _pp_layer_partition(monkeypatch: pytest.MonkeyPatch) -> None:
    import vllm.envs as envs
    from vllm.distributed.utils import get_pp_indices

    from molink.vllm_compat.parallel_state import set_pp_layer_partition

    _require("VLLM_PP_LAYER_PARTITION" in envs.environment_variables, "vLLM dropped it")
    _require(
        _reads(get_pp_indices, "envs.VLLM_PP_LAYER_PARTITION"), "get_pp_indices doesn't read it"
    )
    monkeypatch.delenv("VLLM_PP_LAYER_PARTITION", raising=False)
    set_pp_layer_partition([2, 3])
    _require(envs.environment_variables["VLLM_PP_LAYER_PARTITION"]() == "2,3", "not a comma list")


# ----------------------------------------------------------------------------------- serving


@contract("vllm.entrypoints.generate.base.serving.GenerateBaseServing._raise_if_error")
def _raise_if_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.entrypoints.generate.base.serving import GenerateBaseServing
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    from vllm.exceptions import GenerationError

    from molink.vllm_compat.serving import patch_raise_if_error

    params = _params(GenerateBaseServing._raise_if_error)
    _require(params == ["self", "finish_reason", "request_id"], f"parameters are {params}")
    for cls in (OpenAIServingChat, OpenAIServingCompletion):
        _require(issubclass(cls, GenerateBaseServing), f"{cls.__name__} left GenerateBaseServing")
        _require(
            "self._raise_if_error(" in _source(inspect.getmodule(cls)),
            f"{cls.__name__} no longer calls it",
        )
    monkeypatch.setattr(GenerateBaseServing, "_raise_if_error", GenerateBaseServing._raise_if_error)
    patch_raise_if_error(lambda rid: "no node serves layers 3-5" if rid == "known" else None)
    with pytest.raises(GenerationError, match="no node serves layers 3-5"):
        GenerateBaseServing._raise_if_error(None, "error", "known")  # type: ignore[arg-type]
    with pytest.raises(GenerationError, match="Internal server error"):
        GenerateBaseServing._raise_if_error(None, "error", "other")  # type: ignore[arg-type]
    GenerateBaseServing._raise_if_error(None, "stop", "known")  # type: ignore[arg-type]


@contract("vllm.engine.protocol.EngineClient.generate")
def _engine_generate(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.engine.protocol import EngineClient
    from vllm.entrypoints.openai.chat_completion import serving as chat
    from vllm.v1.engine.async_llm import AsyncLLM

    from molink.vllm_compat.serving import wrap_engine_generate

    _require(hasattr(EngineClient, "generate"), "EngineClient.generate is gone")
    _require(inspect.isasyncgenfunction(AsyncLLM.generate), "AsyncLLM.generate isn't async gen")
    _require("self.engine_client.generate(" in _source(chat), "serving doesn't call it")

    class Engine:
        async def generate(self, n: int) -> Any:
            for i in range(n):
                yield i

    engine, seen = Engine(), []
    wrap_engine_generate(engine, seen.append)  # type: ignore[arg-type]

    async def drain() -> list[int]:
        return [x async for x in engine.generate(3)]

    _require(asyncio.run(drain()) == [0, 1, 2] and seen == [0, 1, 2], "wrapping broke it")


def _serve_http_keywords(func: Any) -> set[str]:
    for node in ast.walk(ast.parse(_source(func))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "serve_http":
            return {k.arg for k in node.keywords if k.arg is not None}
    raise AssertionError(f"{func.__name__} doesn't call serve_http")


def _calls_in_order(func: Any) -> list[str]:
    calls = [
        (node.lineno, node.func.id)
        for node in ast.walk(ast.parse(_source(func)))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    ]
    return [name for _, name in sorted(calls)]


@contract("vllm.entrypoints.launchers.api_server.entry.build_and_serve")
def _build_and_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.entrypoints.launchers.api_server.entry import build_and_serve

    from molink.vllm_compat.openai_server import SERVE_HTTP_ARGS, serve_api_app

    steps = [
        c
        for c in _calls_in_order(build_and_serve)
        if c in ("get_uvicorn_log_config", "build_app", "init_app_state", "serve_http")
    ]
    expected = ["get_uvicorn_log_config", "build_app", "init_app_state", "serve_http"]
    _require(steps == expected, f"build_and_serve's steps are now {steps}, the copy's {expected}")
    vllm_kwargs = _serve_http_keywords(build_and_serve) - {"sock", "peer_loads"}
    ours = _serve_http_keywords(serve_api_app) - {"sock"}
    _require(
        vllm_kwargs == set(SERVE_HTTP_ARGS) == ours,
        f"build_and_serve passes serve_http {sorted(vllm_kwargs)}; the copy passes "
        f"{sorted(ours)} (update openai_server.serve_api_app and SERVE_HTTP_ARGS)",
    )


@contract("vllm.entrypoints.serve.instrumentator.metrics.attach_router")
def _metrics_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from prometheus_client import CollectorRegistry
    from vllm.entrypoints.serve.instrumentator import metrics

    from molink.vllm_compat.serving import wrap_metrics_routes

    monkeypatch.setattr(metrics, "get_prometheus_registry", CollectorRegistry)
    app = FastAPI()
    metrics.attach_router(app)
    scrapes: list[int] = []

    async def before() -> None:
        scrapes.append(1)

    _require(wrap_metrics_routes(app, before) >= 1, "vLLM serves no wrappable /metrics route")
    response = TestClient(app).get("/metrics")
    _require(response.status_code == 200 and scrapes, "a scrape didn't run the refresh first")


@contract("vllm.entrypoints.serve.middleware.authenticate.AuthenticationMiddleware")
def _authentication_middleware(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    from molink.vllm_compat.auth import bearer_token_checker

    params = _params(AuthenticationMiddleware.__init__)
    _require(params == ["self", "app", "tokens"], f"__init__ parameters are {params}")
    _require(_params(AuthenticationMiddleware.verify_token) == ["self", "headers"], "verify_token")
    verify = bearer_token_checker(["k1", "k2"])
    _require(verify({"Authorization": "Bearer k2"}), "a right token is refused")
    for headers in ({}, {"Authorization": "Bearer k3"}, {"Authorization": "Basic k1"}):
        _require(not verify(headers), f"{headers} is accepted")


# ------------------------------------------------------------------------------- wire classes


def _subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _is_data_holder(obj: Any) -> bool:
    """A dataclass, msgspec struct, enum or named tuple whose vLLM classes don't customize how
    it is pickled or rebuilt."""
    if not isinstance(obj, type) or any(
        hook in vars(cls)
        for cls in _vllm_mro(obj)
        for hook in ("__reduce__", "__reduce_ex__", "__setstate__")
    ):
        return False
    if dataclasses.is_dataclass(obj) or hasattr(obj, "__struct_fields__"):
        return True
    if issubclass(obj, enum.Enum):
        return True
    return issubclass(obj, tuple) and hasattr(obj, "_fields")


#: Field types a KV spec may hold that the codec doesn't send, and why that is acceptable.
UNSENT_FIELD_TYPES = {
    # AttentionSpec.tokens_per_state is a Fraction only for Whisper's block pooling
    # (model_executor/models/whisper_causal.py), which MoLink doesn't serve; such a spec is
    # refused by the codec with a clear error.
    "Fraction",
}
_PLAIN_TYPES = {"int", "bool", "str", "float", "None", "tuple", "list", "dict", "torch.dtype"}


def _sample(annotation: str, field: str) -> Any:
    """A value of ``annotation`` (a KV spec field's type) for a required field."""
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVQuantMode, SparseCacheRole

    values: dict[str, Any] = {
        "int": 16,
        "bool": False,
        "str": "auto",
        "torch.dtype": torch.float16,
        "tuple[tuple[int,...],...]": ((2, 3),),
        "tuple[torch.dtype,...]": (torch.float16,),
        "MambaAttentionBackendEnum": next(iter(MambaAttentionBackendEnum)),
        "KVQuantMode": next(iter(KVQuantMode)),
        "SparseCacheRole": next(iter(SparseCacheRole)),
    }
    key = annotation.replace(" ", "")
    if key == "dict[str,KVCacheSpec]":
        return {"layers.0.attn": _build_spec(FullAttentionSpec)}
    if key not in values:
        raise AssertionError(f"no sample value for {field}: {annotation} (a new field type?)")
    return values[key]


def _build_spec(cls: type) -> Any:
    from vllm.v1.attention.backend import MultipleOf

    kwargs = {
        f.name: _sample(str(f.type), f"{cls.__name__}.{f.name}")
        for f in dataclasses.fields(cls)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    kwargs["block_stride_alignment"] = MultipleOf(16)  # what MLA backends set
    return cls(**kwargs)


def kv_spec_classes() -> list[type]:
    """Every KVCacheSpec subclass vLLM defines (of the modules imported now)."""
    from vllm.v1.kv_cache_interface import KVCacheSpec

    return [KVCacheSpec, *dict.fromkeys(_subclasses(KVCacheSpec))]


@contract("vllm step payload classes (codec allowlist)")
def _wire_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        KVCacheTensor,
    )

    from molink.comm import codec
    from molink.vllm_compat.wire_classes import VLLM_WIRE_CLASSES

    listed = set()
    for module, names in VLLM_WIRE_CLASSES.items():
        mod = importlib.import_module(module)
        for name in names:
            obj = getattr(mod, name, None)
            _require(obj is not None, f"{module}.{name} is gone")
            # a class the codec never calls (an abstract marker) only names itself
            never_built = codec._GLOBAL_CALLS[module, name][0] == "value"
            _require(
                _is_data_holder(obj) or never_built,
                f"{module}.{name} is no plain data holder any more",
            )
            listed.add(obj)
    for cls in kv_spec_classes():
        _require(cls in listed, f"{cls.__module__}.{cls.__qualname__} is not allowed on the wire")
        for f in dataclasses.fields(cls):
            for name in re.findall(r"[A-Za-z_][\w.]*", str(f.type)):
                known = name in _PLAIN_TYPES or name in UNSENT_FIELD_TYPES
                _require(
                    known or any(c.__name__ == name for c in listed),
                    f"{cls.__name__}.{f.name} holds a {name}, which is not allowed on the wire",
                )
        spec = _build_spec(cls)
        _require(codec.loads(codec.dumps(spec)) == spec, f"{cls.__name__} doesn't round-trip")
    step = SchedulerOutput.make_empty()
    step.finished_req_ids = {"a", "b"}
    back, snapshots = codec.loads_step(codec.dumps_step(step, {}))
    _require(back.finished_req_ids == {"a", "b"} and snapshots == {}, "SchedulerOutput")
    plan = KVCacheConfig(
        num_blocks=8,
        kv_cache_tensors=[
            KVCacheTensor(size=1024, layers=["layers.0.attn"], layer_stride=0, block_stride=128)
        ],
        kv_cache_groups=[KVCacheGroupSpec(["layers.0.attn"], _build_spec(FullAttentionSpec))],
    )
    _require(codec.loads(codec.dumps(plan)) == plan, "KVCacheConfig doesn't round-trip")


# ------------------------------------------------------------------------------ the contracts


@pytest.mark.parametrize("internal", INTERNALS, ids=lambda i: i.symbol)
def test_vllm_contract(internal: Internal, monkeypatch: pytest.MonkeyPatch) -> None:
    check = CONTRACTS.get(internal.symbol)
    assert check is not None, f"no contract check for {internal.symbol}"
    try:
        check(monkeypatch)
        return
    except Exception as e:  # noqa: BLE001  # any failure is a broken contract: say which
        found = f"{type(e).__name__}: {e}"
    pytest.fail(
        f"vLLM changed {internal.symbol}.\n"
        f"  MoLink (molink.vllm_compat.{internal.function}) needs: {internal.need}.\n"
        f"  Found: {found}",
        pytrace=False,
    )


def test_every_internal_has_one_contract_and_a_home() -> None:
    symbols = [i.symbol for i in INTERNALS]
    assert len(symbols) == len(set(symbols)), "an internal is listed twice"
    assert set(CONTRACTS) == set(symbols), (
        f"contracts without an internal: {sorted(set(CONTRACTS) - set(symbols))}; "
        f"internals without a contract: {sorted(set(symbols) - set(CONTRACTS))}"
    )
    for internal in INTERNALS:
        for function in internal.function.split(", "):
            module, _, path = function.partition(".")
            home = importlib.import_module(f"molink.vllm_compat.{module}")
            obj: Any = home
            for part in path.split("."):
                obj = getattr(obj, part)
            if not callable(obj):  # a table: its module says what it is for
                obj = home
            assert obj.__doc__ and "vLLM" in obj.__doc__, f"{function} doesn't say what it needs"


def test_private_names_are_vllm_compats_own() -> None:
    """Every name of PRIVATE_NAMES is used in vllm_compat (a stale entry is removed)."""
    text = "".join(
        p.read_text(encoding="utf-8") for p in COMPAT.glob("*.py") if p.stem != "__init__"
    )
    unused = sorted(name for name in PRIVATE_NAMES if name not in text)
    assert not unused, f"PRIVATE_NAMES lists names vllm_compat doesn't use: {unused}"


# -------------------------------------------------------------------------------- the guard


def _vllm_names(tree: ast.Module) -> set[str]:
    """Names a module binds to vLLM modules or objects (``import vllm.x as y``, ``from vllm...
    import z``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "vllm":
                    names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vllm":
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def _root(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute | ast.Subscript | ast.Call):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _targets(node: ast.AST) -> Iterator[ast.expr]:
    if isinstance(node, ast.Assign):
        pending = list(node.targets)
    elif isinstance(node, ast.AugAssign | ast.AnnAssign):
        pending = [node.target]
    elif isinstance(node, ast.Delete):
        pending = list(node.targets)
    else:
        return
    while pending:
        target = pending.pop()
        if isinstance(target, ast.Tuple | ast.List):
            pending.extend(target.elts)
        elif isinstance(target, ast.Starred):
            pending.append(target.value)
        else:
            yield target


def vllm_internals_in(source: str, filename: str) -> list[str]:
    """Where ``source`` touches vLLM internals itself: ``file:line what`` for each."""
    tree = ast.parse(source, filename)
    vllm = _vllm_names(tree)
    found = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vllm":
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"{filename}:{line} imports vLLM's private {alias.name}")
        elif isinstance(node, ast.Attribute):
            private = node.attr.startswith("_") and not node.attr.startswith("__")
            if node.attr in PRIVATE_NAMES or (private and _root(node.value) in vllm):
                found.append(f"{filename}:{line} uses vLLM's private {ast.unparse(node)}")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if node.name in PRIVATE_NAMES:
                found.append(f"{filename}:{line} overrides vLLM's private {node.name}")
        elif (
            isinstance(node, ast.Constant) and isinstance(node.value, str)
        ) and node.value in PRIVATE_NAMES:
            found.append(f"{filename}:{line} names vLLM's private {node.value}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in (
            "setattr",
            "delattr",
        ):
            obj, name = (node.args + [None, None])[:2]  # type: ignore[list-item]
            patched = isinstance(name, ast.Constant) and name.value in PATCHED_ATTRIBUTES
            if patched or (obj is not None and _root(obj) in vllm):
                found.append(f"{filename}:{line} patches vLLM: {ast.unparse(node)}")
        for target in _targets(node):
            if isinstance(target, ast.Attribute) and (
                target.attr in PATCHED_ATTRIBUTES or _root(target.value) in vllm
            ):
                found.append(f"{filename}:{line} patches vLLM: {ast.unparse(target)} = ...")
    return found


def test_the_guard_sees_every_kind_of_use() -> None:
    source = textwrap.dedent(
        """
        from vllm.config import VllmConfig
        from vllm.distributed import parallel_state
        from vllm.utils import _secret
        import vllm.envs as envs

        class S:
            def _preempt_request(self, request): ...

        parallel_state._PP = None
        VllmConfig.max_concurrent_batches = property(lambda self: 3)
        envs.VLLM_X = 1
        runner.execute_model_state, runner.intermediate_tensors = batch
        runner._may_reorder_batch = None
        setattr(engine, "generate", None)
        getattr(runner, "_init_mrope_positions")(state)
        self.running = []
        self.my_own_state = 1
        """
    )
    found = "\n".join(vllm_internals_in(source, "x.py"))
    for expected in (
        "x.py:4 imports vLLM's private _secret",
        "x.py:8 overrides vLLM's private _preempt_request",
        "x.py:10 uses vLLM's private parallel_state._PP",
        "x.py:10 patches vLLM: parallel_state._PP",
        "x.py:11 patches vLLM: VllmConfig.max_concurrent_batches",
        "x.py:12 patches vLLM: envs.VLLM_X",
        "x.py:13 patches vLLM: runner.execute_model_state",
        "x.py:13 patches vLLM: runner.intermediate_tensors",
        "x.py:14 uses vLLM's private runner._may_reorder_batch",
        "x.py:15 patches vLLM: setattr(engine, 'generate', None)",
        "x.py:16 names vLLM's private _init_mrope_positions",
        "x.py:17 patches vLLM: self.running",
    ):
        assert expected in found, f"{expected!r} not found in:\n{found}"
    assert "my_own_state" not in found


def test_only_vllm_compat_touches_vllm_internals() -> None:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if COMPAT in path.parents or "__pycache__" in path.parts:
            continue
        where = str(path.relative_to(ROOT))
        problems += vllm_internals_in(path.read_text(encoding="utf-8"), where)
    assert not problems, (
        "vLLM internals outside molink/vllm_compat (move them behind a vllm_compat function, "
        "with a contract test):\n" + "\n".join(problems)
    )


def test_vllm_compat_has_a_docstring_per_module() -> None:
    for path in COMPAT.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert ast.get_docstring(tree), f"{path.name} has no docstring"
    assert vllm_compat.__doc__ and "INTERNALS" in vllm_compat.__doc__
