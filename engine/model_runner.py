"""The model runner: the only code that owns device tensors.

It loads the model, sizes and allocates the paged KV cache, and executes one
``SchedulerOutput`` at a time: flatten the scheduled sequences into one batch (decodes first,
then prefill chunks), build the ``AttentionMetadata``, run the model, and sample one token for
every sequence whose step reaches its last known token.

Per-request state it keeps between steps: the ``Request`` (read-only: token history for
penalties) and a seeded ``torch.Generator`` when the request has a seed. Both are dropped when
the scheduler reports the request finished or preempted.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata, get_attention_backend
from engine.config import EngineConfig
from engine.cuda_graphs import DEFAULT_MAX_SEQ_LEN_TO_CAPTURE, CudaGraphDecodeRunner
from engine.kernels import cpu_layer_ops
from engine.kernels.cpu_paged_decode import is_available as cpu_ops_available
from engine.kv_cache import TORCH_DTYPES, allocate_kv_caches, num_blocks_for_budget
from engine.loader import load_model, resolve_model_path
from engine.request import Request
from engine.sampler import Sampler, build_sampling_metadata, make_generator
from engine.scheduler_output import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_linear_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """``ParallelConfig.linear_backend`` made concrete: "onednn" or "torch"."""
    onednn_fits = (
        device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
    )
    if name == "auto":
        return "onednn" if onednn_fits else "torch"
    if name == "onednn" and not onednn_fits:
        raise ValueError(
            f"linear_backend 'onednn' needs the CPU, float32 and a torch built with oneDNN; "
            f"got device {device}, dtype {dtype}, oneDNN available: "
            f"{torch.backends.mkldnn.is_available()}"
        )
    return name


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    metadata: AttentionMetadata
    sample_indices: torch.Tensor  # [num_sampled] rows of the hidden states to sample from
    sampled_request_ids: list[str]


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.parallel.device)
        if config.parallel.num_threads is not None:
            torch.set_num_threads(config.parallel.num_threads)
        self.dtype = TORCH_DTYPES[config.model.dtype]
        self.block_size = config.cache.block_size
        self.attention_backend = get_attention_backend(
            config.parallel.attention_backend, self.device.type
        )
        self.model_path = resolve_model_path(config.model.model)
        self.linear_backend = resolve_linear_backend(
            config.parallel.linear_backend, self.device, self.dtype
        )
        self.model, self.hf_config = load_model(config.model, self.attention_backend, self.device)
        cpu_fp32 = self.device.type == "cpu" and self.dtype == torch.float32
        layer_ops = cpu_fp32 and cpu_ops_available()
        if self.linear_backend == "onednn":  # packed once, in the form the layer ops will use
            self.model.pack_for_cpu(panels=layer_ops and cpu_layer_ops.panel_linear_pays())
        if layer_ops:
            self.model.use_cpu_layer_ops()
        self.geometry = self.model.args
        max_position = self.hf_config.max_position_embeddings
        self.max_model_len = min(config.model.max_model_len or max_position, max_position)
        self.num_blocks = num_blocks_for_budget(
            cache_config=config.cache,
            num_layers=self.geometry.num_layers,
            num_kv_heads=self.geometry.num_kv_heads,
            head_dim=self.geometry.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self.kv_caches = allocate_kv_caches(
            num_layers=self.geometry.num_layers,
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            num_kv_heads=self.geometry.num_kv_heads,
            head_dim=self.geometry.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        logger.info(
            "model loaded on %s (%s, attention=%s, linear=%s); KV cache: %d blocks of %d tokens",
            self.device,
            config.model.dtype,
            self.attention_backend.name,
            self.linear_backend,
            self.num_blocks,
            self.block_size,
        )
        self.cuda_graphs = self._maybe_capture_cuda_graphs()
        self.sampler = Sampler()
        self._requests: dict[str, Request] = {}
        self._generators: dict[str, torch.Generator] = {}
        # The persistent block table: one row per request the scheduler runs, filled from
        # each step's ``new_block_ids``; rows are recycled when a request finishes or is
        # preempted. Host memory: the step's rows are copied to the device with the metadata.
        max_rows = config.scheduler.max_num_seqs
        self._block_table = torch.zeros(
            (max_rows, -(-self.max_model_len // self.block_size)), dtype=torch.int32
        )  # [rows, max_blocks_per_seq]
        self._num_blocks = [0] * max_rows  # per row: how many block ids it holds
        self._rows: dict[str, int] = {}
        self._free_rows = list(range(max_rows - 1, -1, -1))

    def _maybe_capture_cuda_graphs(self) -> CudaGraphDecodeRunner | None:
        """Decode steps replay CUDA graphs on CUDA with the Triton backend, unless eager."""
        if (
            self.device.type != "cuda"
            or self.config.parallel.enforce_eager
            or self.attention_backend.name != "triton"
        ):
            return None
        graphs = CudaGraphDecodeRunner(
            self.model,
            self.kv_caches,
            max_num_seqs=self.config.scheduler.max_num_seqs,
            max_num_blocks_per_seq=-(-self.max_model_len // self.block_size),
            # Longer contexts run eagerly, as in vLLM.
            max_seq_len_to_capture=min(self.max_model_len, DEFAULT_MAX_SEQ_LEN_TO_CAPTURE),
        )
        graphs.capture()
        return graphs

    # -- per-request state -------------------------------------------------------------

    def _update_states(self, scheduler_output: SchedulerOutput) -> None:
        for request_id in scheduler_output.finished_request_ids:
            self._requests.pop(request_id, None)
            self._generators.pop(request_id, None)
            self._release_row(request_id)
        # A seeded request's generator is reseeded per output index (``step_seed``), so a
        # preempted, resumed or migrated request draws what an uninterrupted one would.
        for request_id in scheduler_output.preempted_request_ids:
            self._requests.pop(request_id, None)
            self._release_row(request_id)
        for request in scheduler_output.new_requests:
            self._requests[request.request_id] = request
            seed = request.sampling_params.seed
            if seed is not None and request.request_id not in self._generators:
                self._generators[request.request_id] = make_generator(seed, self.device)

    # -- inputs ------------------------------------------------------------------------

    def _block_table_row(self, request_id: str) -> int:
        row = self._rows.get(request_id)
        if row is None:
            if not self._free_rows:  # more requests than max_num_seqs: grow the table
                extra = self._block_table.shape[0]
                self._block_table = torch.cat(
                    [self._block_table, torch.zeros_like(self._block_table)]
                )
                self._free_rows.extend(range(2 * extra - 1, extra - 1, -1))
                self._num_blocks.extend([0] * extra)
            row = self._rows[request_id] = self._free_rows.pop()
        return row

    def _release_row(self, request_id: str) -> None:
        row = self._rows.pop(request_id, None)
        if row is not None:
            self._block_table[row].zero_()
            self._num_blocks[row] = 0
            self._free_rows.append(row)

    def prepare_inputs(self, scheduler_output: SchedulerOutput) -> StepInputs:
        """Flatten the step: per sequence only Python lists of ids; per token, tensor ops."""
        block_size = self.block_size
        table = self._block_table
        input_ids: list[int] = []
        rows: list[int] = []
        starts: list[int] = []
        query_lens: list[int] = []
        sample_indices: list[int] = []
        sampled_request_ids: list[str] = []
        num_decodes = 0
        num_tokens = 0
        for seq in scheduler_output.sequences:
            row = self._block_table_row(seq.request_id)
            if seq.new_block_ids:
                num_known = self._num_blocks[row]
                num_new = len(seq.new_block_ids)
                table[row, num_known : num_known + num_new] = torch.tensor(
                    seq.new_block_ids, dtype=torch.int32
                )
                self._num_blocks[row] = num_known + num_new
            input_ids.extend(seq.token_ids)
            rows.append(row)
            starts.append(seq.start_position)
            query_lens.append(seq.num_tokens)
            num_tokens += seq.num_tokens
            if seq.sample:
                sample_indices.append(num_tokens - 1)
                sampled_request_ids.append(seq.request_id)
            if seq.num_tokens == 1 and num_decodes == len(rows) - 1:
                num_decodes += 1
        seq_lens = [a + n for a, n in zip(starts, query_lens)]
        query_start_loc = [0, *itertools.accumulate(query_lens)]
        max_blocks = -(-max(seq_lens, default=1) // block_size)
        rows_t = torch.tensor(rows, dtype=torch.long)
        block_tables = table.index_select(0, rows_t)[:, : max(max_blocks, 1)]  # [seqs, blocks]
        # positions: start of each token's sequence + its offset in the chunk
        lens_t = torch.tensor(query_lens, dtype=torch.long)
        token_seq = torch.repeat_interleave(torch.arange(len(rows)), lens_t)  # [num_tokens]
        chunk_starts = torch.tensor(query_start_loc[:-1], dtype=torch.long)
        positions = (
            torch.tensor(starts, dtype=torch.long)[token_seq]
            + torch.arange(num_tokens)
            - chunk_starts[token_seq]
        )
        slot_mapping = (
            block_tables[token_seq, positions // block_size].long() * block_size
            + positions % block_size
        )
        device = self.device
        metadata = AttentionMetadata(
            num_decodes=num_decodes,
            num_decode_tokens=num_decodes,
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=block_tables.to(device),
            slot_mapping=slot_mapping.to(device),
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            query_start_loc_cpu=query_start_loc,
            seq_lens_cpu=seq_lens,
        )
        return StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
            positions=positions.to(device),
            metadata=metadata,
            sample_indices=torch.tensor(sample_indices, dtype=torch.long, device=device),
            sampled_request_ids=sampled_request_ids,
        )

    # -- execution ---------------------------------------------------------------------

    @torch.inference_mode()
    def execute(
        self,
        scheduler_output: SchedulerOutput,
        layer_callback: Callable[[int], None] | None = None,
    ) -> ModelRunnerOutput:
        """Run one step. ``layer_callback(layer)`` fires once a layer's K/V are in the cache."""
        self._update_states(scheduler_output)
        if scheduler_output.is_empty:
            return ModelRunnerOutput(sampled_token_ids={})
        inputs = self.prepare_inputs(scheduler_output)
        hidden_states = None
        if self.cuda_graphs is not None and layer_callback is None:
            # None unless the step is decode-only and fits a captured size.
            hidden_states = self.cuda_graphs.run(
                inputs.input_ids, inputs.positions, inputs.metadata
            )
        if hidden_states is None:
            # Only the sampled rows leave the last layer (none in a chunk that samples none).
            hidden_states = self.model(
                inputs.input_ids,
                inputs.positions,
                self.kv_caches,
                inputs.metadata,
                layer_callback=layer_callback,
                output_rows=inputs.sample_indices,
            )
        else:  # a captured decode graph returns every row
            hidden_states = hidden_states[inputs.sample_indices]
        if not inputs.sampled_request_ids:
            return ModelRunnerOutput(sampled_token_ids={})
        logits = self.model.compute_logits(hidden_states)
        requests = [self._requests[rid] for rid in inputs.sampled_request_ids]
        sampling_metadata = build_sampling_metadata(requests, self._generators, self.device)
        sampled = self.sampler(logits, sampling_metadata)
        token_ids = dict(zip(inputs.sampled_request_ids, sampled.token_ids))
        logprobs = {}
        if sampled.logprobs is not None:
            logprobs = {
                rid: lp
                for rid, lp in zip(inputs.sampled_request_ids, sampled.logprobs)
                if lp is not None
            }
        return ModelRunnerOutput(sampled_token_ids=token_ids, logprobs=logprobs)
