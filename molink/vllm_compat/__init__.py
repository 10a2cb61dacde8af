"""Every vLLM internal MoLink relies on, in one place.

MoLink runs vLLM's own engine, scheduler, worker and OpenAI server and changes them at a few
points no plug-in reaches. Each such point (a private vLLM name, a patch of a vLLM class or
module, a vLLM attribute rewritten for a while, or vLLM behaviour copied because vLLM offers no
hook) lives in this package, behind a small named function or a thin base class whose docstring
says what MoLink needs from vLLM. The rest of ``molink`` calls those and never touches the
internals itself (``tests/test_vllm_compat.py`` scans the package for that).

:data:`INTERNALS` lists them; ``tests/test_vllm_compat.py`` has one contract test per entry,
which fails naming the vLLM symbol and what MoLink needs from it. When moving to a new vLLM, run
those tests first (``docs/upgrading-vllm.md``).

Modules, by area:

* :mod:`.engine_config`: the batch queue bound (``VllmConfig.max_concurrent_batches``).
* :mod:`.scheduler`: :class:`~.scheduler.SchedulerHooks`, the scheduler's private methods and
  state.
* :mod:`.executor`: :class:`~.executor.ExecutorHooks` and the ``collective_rpc`` side channel.
* :mod:`.kv_cache`: KV cache planning at a forced block count, a follower's plan in its head's
  cache groups, the bytes a plan allocates, and the layout EngineCore stamps.
* :mod:`.model_runner`: the model runner's persistent batch, request table and buffers.
* :mod:`.worker`: the platform worker a stage worker extends; the V1 runner switch.
* :mod:`.parallel_state`: "pipeline rank r of N" without peers (``parallel_state._PP``).
* :mod:`.serving`: the OpenAI serving layer: failure causes, ``/metrics`` routes.
* :mod:`.openai_server`: vLLM's ``build_and_serve``, copied.
* :mod:`.auth`: vLLM's ``--api-key`` check, for MoLink's own routes.
* :mod:`.detokenizer`: vLLM's incremental detokenizer, right for prompts that end mid-character.
* :mod:`.wire_classes`: the vLLM classes a step payload may name (the codec's allowlist).
* :mod:`.shutdown`: vLLM's process-tree kill at shutdown, for children that exit meanwhile.

This package sits at the lowest layer: it imports only vLLM, torch, the standard library and
MoLink's layer-0 modules.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Internal:
    """One vLLM internal MoLink relies on."""

    symbol: str  # the vLLM symbol, as ``module.Class.attribute`` (or what it is)
    function: str  # where MoLink uses it: the vllm_compat function or class
    need: str  # what MoLink needs from it (the contract test checks this)


#: Every vLLM internal MoLink uses, with the vllm_compat function that uses it. Each has a
#: contract test of the same ``symbol`` in ``tests/test_vllm_compat.py``.
INTERNALS: tuple[Internal, ...] = (
    Internal(
        "vllm.config.VllmConfig.max_concurrent_batches",
        "engine_config.install_batch_queue_bound",
        "a property of VllmConfig (replaceable on the class) that EngineCore.__init__ reads to "
        "size its batch queue",
    ),
    Internal(
        "vllm.v1.core.sched.scheduler.Scheduler._make_cached_request_data",
        "scheduler.SchedulerHooks.cached_request_data",
        "a method (running_reqs, resumed_reqs, num_scheduled_tokens, spec_decode_tokens, "
        "req_to_new_blocks) returning the step's CachedRequestData, with an all_token_ids dict",
    ),
    Internal(
        "vllm.v1.core.sched.scheduler.Scheduler._preempt_request",
        "scheduler.SchedulerHooks.on_request_preempted",
        "called with the request first for every preemption (KV cache full, and "
        "reset_prefix_cache(reset_running_requests=True))",
    ),
    Internal(
        "vllm.v1.core.sched.scheduler.Scheduler._free_request",
        "scheduler.SchedulerHooks.on_request_freed",
        "called with the request first for every request that finishes (finish_requests included)",
    ),
    Internal(
        "vllm.v1.core.sched.scheduler.Scheduler._pause_state",
        "scheduler.SchedulerHooks.schedule_paused",
        "an instance attribute that schedule() reads on every call; PauseState.PAUSED_ALL "
        "schedules no tokens",
    ),
    Internal(
        "vllm.v1.core.sched.scheduler.Scheduler.running",
        "scheduler.SchedulerHooks.schedule_subset",
        "schedule() reads the running list, max_num_scheduled_tokens, max_num_running_reqs and "
        "max_num_active_reqs (the admission cap) from the instance on every call, so they can "
        "be narrowed for one call",
    ),
    Internal(
        "vllm.v1.core.block_pool.BlockPool.blocks",
        "scheduler.SchedulerHooks.retire_kv_blocks",
        "the scheduler's kv_cache_manager.block_pool keeps block i at blocks[i] and the free ones "
        "in free_block_queue (remove(block), append_n(blocks)); allocation, usage and "
        "reset_prefix_cache count num_gpu_blocks, so cutting both retires the blocks above a "
        "size, and KVCacheBlock(i, pool=pool) appended to both grows the pool back "
        "(SchedulerHooks.grow_kv_blocks)",
    ),
    Internal(
        "vllm.v1.request.Request.num_in_flight_tokens",
        "scheduler.SchedulerHooks.confirmed_tokens",
        "_update_after_schedule adds each step's scheduled tokens to num_computed_tokens and "
        "num_in_flight_tokens; update_from_output takes them off num_in_flight_tokens",
    ),
    Internal(
        "vllm.v1.core.sched.scheduler.Scheduler.prev_step_scheduled_req_ids",
        "scheduler.SchedulerHooks.roll_back_to_confirmed",
        "update_from_output drops a step's output while the request's num_stale_output_tokens "
        "covers it under drop_stale_output (as _preempt_request(request, timestamp, "
        "drop_stale_output=True) sets them); prev_step_scheduled_req_ids is cleared when "
        "requests must be told again; kv_cache_manager.evict_blocks(ids) drops cached hashes",
    ),
    Internal(
        "vllm.v1.worker.gpu_model_runner.GPUModelRunner._update_states",
        "scheduler.SchedulerHooks.mark_resumed",
        "a worker replaces a resumed request's block ids with new_block_ids (all its blocks) "
        "and adds it to its persistent batch",
    ),
    Internal(
        "vllm.v1.worker.gpu_input_batch.InputBatch.req_ids",
        "model_runner.scheduled_rows",
        "the model runner lays each scheduled request's tokens out as one run of rows, in "
        "input_batch.req_ids order (_prepare_inputs reads num_scheduled_tokens by that order)",
    ),
    Internal(
        "vllm.v1.engine.detokenizer.FastIncrementalDetokenizer.__init__",
        "detokenizer.fix_prompt_tail_detokenization",
        "it primes DecodeStream(ids=request.prompt_token_ids) and sets self.stream, "
        "self.tokenizer and self.skip_special_tokens; _protected_step(token_id) steps the stream",
    ),
    Internal(
        "vllm.v1.utils.kill_process_tree",
        "shutdown.tolerate_vanishing_children",
        "vllm.v1.utils.shutdown calls kill_process_tree(pid), by the name vllm.v1.utils "
        "imported, for each engine process alive after its timeout; vLLM's own raises "
        "psutil.NoSuchProcess for a child that exits meanwhile",
    ),
    Internal(
        "vllm.v1.executor.abstract.Executor._init_executor",
        "executor.ExecutorHooks.init_executor",
        "the abstract set-up method Executor.__init__ calls once vllm_config is set",
    ),
    Internal(
        "vllm.engine.protocol.EngineClient.collective_rpc",
        "executor.call_executor",
        "AsyncLLM.collective_rpc(method) reaches Executor.collective_rpc(method, timeout, args, "
        "kwargs) in the engine process and returns its list of results",
    ),
    Internal(
        "vllm.config.CacheConfig.num_gpu_blocks_override",
        "kv_cache.plan_kv_cache_with_blocks",
        "get_kv_cache_configs(vllm_config, specs, available_memory) plans exactly "
        "cache_config.num_gpu_blocks_override blocks when it is set",
    ),
    Internal(
        "vllm.v1.core.kv_cache_utils.get_kv_cache_config_from_groups",
        "kv_cache.plan_stage_kv_cache",
        "get_kv_cache_config_from_groups(vllm_config, kv_cache_groups, available_memory) plans "
        "one worker from the whole model's groups projected onto its layers, as "
        "get_kv_cache_configs does for every pipeline stage",
    ),
    Internal(
        "vllm.config.CacheConfig.mamba_cache_mode",
        "model_runner.mamba_alignment_where_held",
        'in "align" mode execute_model preprocesses Mamba state every step and '
        "mamba_utils.get_mamba_groups asserts the worker's plan holds a Mamba layer; the mode is "
        "read from cache_config at each step",
    ),
    Internal(
        "vllm.config.CacheConfig.mamba_block_size",
        "kv_cache.align_mamba_block_size",
        "a Mamba layer's MambaSpec takes cache_config.mamba_block_size as its block size, and in "
        '"align" mode vLLM makes it equal to block_size',
    ),
    Internal(
        "vllm.v1.worker.utils.allocate_kv_cache",
        "kv_cache.kv_cache_bytes",
        "every KVCacheTensor of a plan places its layers in one backing allocation of "
        "tensor.size bytes (cache groups alias it)",
    ),
    Internal(
        "vllm.v1.kv_cache_interface.KVCacheConfig.kv_cache_layout",
        "kv_cache.stamp_kv_cache_layout",
        "EngineCore sets every worker's KVCacheConfig.kv_cache_layout from "
        "cache_config.kv_cache_layout (copied for stages EngineCore never sees)",
    ),
    Internal(
        "vllm.v1.worker.gpu_model_runner.GPUModelRunner.intermediate_tensors",
        "model_runner.ensure_intermediate_tensors",
        "an attribute (None until _dummy_run) that execute_model copies received activations "
        "into; model.make_empty_intermediate_tensors(batch_size, dtype, device) fills it",
    ),
    Internal(
        "vllm.v1.worker.gpu_input_batch.CachedRequestState",
        "model_runner.install_request_state",
        "a dataclass whose fields include every one MoLink sets and whose required fields are "
        "among them",
    ),
    Internal(
        "vllm.v1.worker.gpu_model_runner.GPUModelRunner._init_mrope_positions",
        "model_runner.install_request_state",
        "a method (req_state) that fills an installed request's M-RoPE positions",
    ),
    Internal(
        "vllm.v1.worker.gpu_model_runner.GPUModelRunner._may_reorder_batch",
        "model_runner.rows_in_order",
        "_update_states calls _may_reorder_batch(scheduler_output) once the persistent batch "
        "holds exactly the scheduled requests, condensed, before refresh_metadata; "
        "InputBatch.swap_states(i, j) swaps two rows and their req_id_to_index entries",
    ),
    Internal(
        "vllm.v1.worker.gpu_model_runner.GPUModelRunner.reorder_batch_threshold",
        "model_runner.reorders_rows",
        "None when no attention backend of the runner reorders the rows of a step",
    ),
    Internal(
        "vllm.v1.worker.gpu_model_runner.GPUModelRunner.max_num_tokens",
        "model_runner.step_limits",
        "max_num_tokens and max_num_reqs (max_num_batched_tokens, max_num_seqs) size the "
        "runner's per-step buffers",
    ),
    Internal(
        "vllm.v1.core.sched.output.SchedulerOutput (fields)",
        "step_joining.join_steps, step_joining.split_output",
        "the fields of SchedulerOutput, CachedRequestData and ModelRunnerOutput are the ones "
        "step_joining names; a ModelRunnerOutput has one entry per scheduled request",
    ),
    Internal(
        "vllm.v1.worker.gpu_model_runner.GPUModelRunner.execute_model_state",
        "model_runner.reset_model_runner",
        "an attribute set in __init__ that execute_model refuses to run past while a step "
        "awaits sample_tokens (cleared to forget that step)",
    ),
    Internal(
        "vllm.platforms.*.check_and_update_config worker_cls",
        "worker.platform_worker_class",
        "each platform sets parallel_config.worker_cls to the qualname in PLATFORM_WORKERS",
    ),
    Internal(
        "vllm.envs.VLLM_USE_V2_MODEL_RUNNER",
        "worker.use_v1_model_runner",
        "an environment variable vLLM reads to choose the V2 model runner ('0': V1)",
    ),
    Internal(
        "vllm.distributed.parallel_state._PP",
        "parallel_state.replace_pp_group",
        "the module global that get_pp_group() returns",
    ),
    Internal(
        "vllm.distributed.parallel_state.GroupCoordinator",
        "parallel_state.StagePipelineGroup",
        "the membership attributes vLLM's model code reads from the PP group, all present on "
        "StagePipelineGroup",
    ),
    Internal(
        "vllm.envs.VLLM_PP_LAYER_PARTITION",
        "parallel_state.set_pp_layer_partition",
        "an environment variable get_pp_indices reads at model build time: one layer count "
        "per pipeline rank",
    ),
    Internal(
        "vllm.entrypoints.generate.base.serving.GenerateBaseServing._raise_if_error",
        "serving.patch_raise_if_error",
        "a method (finish_reason, request_id) the OpenAI serving classes call on every output, "
        "raising GenerationError for finish_reason 'error'",
    ),
    Internal(
        "vllm.engine.protocol.EngineClient.generate",
        "serving.wrap_engine_generate",
        "an async generator method the serving layer looks up on the engine client instance",
    ),
    Internal(
        "vllm.entrypoints.launchers.api_server.entry.build_and_serve",
        "openai_server.build_api_app, openai_server.serve_api_app",
        "its steps (build_app, init_app_state, serve_http with these keyword arguments), "
        "copied so MoLink can add routes between building the app and serving it",
    ),
    Internal(
        "vllm.entrypoints.serve.instrumentator.metrics.attach_router",
        "serving.wrap_metrics_routes",
        "vLLM serves /metrics as starlette Route/Mount entries whose .app can be wrapped",
    ),
    Internal(
        "vllm.entrypoints.serve.middleware.authenticate.AuthenticationMiddleware",
        "auth.bearer_token_checker",
        "built with (app=None, tokens), verify_token(headers) accepts 'Authorization: Bearer "
        "<token>' for one of the tokens and nothing else",
    ),
    Internal(
        "vllm step payload classes (codec allowlist)",
        "wire_classes.VLLM_WIRE_CLASSES",
        "every listed class imports and is a plain data holder; every KVCacheSpec subclass "
        "vLLM defines is listed and round-trips through the codec",
    ),
)

#: Private vLLM names (attributes, methods, module globals) that only this package may name.
PRIVATE_NAMES: frozenset[str] = frozenset(
    {
        "_PP",
        "_raise_if_error",
        "_make_cached_request_data",
        "_preempt_request",
        "_free_request",
        "_pause_state",
        "_init_executor",
        "_init_mrope_positions",
        "_may_reorder_batch",
        "_protected_step",
    }
)

#: Attributes of vLLM classes, modules and objects that this package writes (patches, or
#: rewrites for a while); no other module of ``molink`` may assign them.
PATCHED_ATTRIBUTES: frozenset[str] = frozenset(
    {
        "max_concurrent_batches",  # VllmConfig, class property
        "kill_process_tree",  # the vllm.v1.utils module's name for it
        "generate",  # the engine client instance
        "running",  # Scheduler, for one schedule() call
        "max_num_scheduled_tokens",
        "max_num_running_reqs",
        "max_num_active_reqs",
        "num_gpu_blocks_override",  # CacheConfig, for one planning call
        "num_gpu_blocks",  # BlockPool and CacheConfig, when the head's KV cache is resized
        "kv_cache_layout",  # KVCacheConfig (as EngineCore does)
        "intermediate_tensors",  # the model runner
        "execute_model_state",
        "__init__",  # FastIncrementalDetokenizer (vllm_compat.detokenizer)
        "stream",  # its DecodeStream
    }
    | PRIVATE_NAMES
)
