"""The unified model: a `transformers` causal LM over the shared vocabulary, with the weighted span loss.

No DeepSpeed, no torch.distributed and no file I/O besides `transformers`' own save/load: the training
entry point wraps this module, and `Policy`/`WorldModel` call it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unified.errors import UnifiedError
from unified.layout import TokenLayout
from unified.sequences import IGNORE, TASKS

ACTION_TOKENS = ("bins", "fast")


@dataclass
class ModelConfig:
    # -- backbone: a Llama-family causal LM built from these sizes, or a local pretrained LM (init_from)
    hidden_size: int = 256  # width of the residual stream
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # grouped-query attention when fewer than num_heads; None: num_heads
    intermediate_size: int = 704  # MLP width (~2.75x hidden, as Llama)
    max_position_embeddings: int = 1024  # longest sample (positions restart at 0 in every packed sample)
    rope_theta: float = 10000.0
    init_from: str | None = None  # local directory of a pretrained LM; its embeddings are resized to the layout
    # -- loss
    image_loss_weight: float = 0.04  # image tokens are many and individually unimportant (prior art: 0.04)
    z_loss: float = 0.0  # weight of log(Z)^2, keeps logits from drifting in long runs
    # The action tokens' targets spread over the neighbouring bins of their dimension: a Gaussian this many bins
    # wide (0: the recorded bin alone), so that a near miss costs less than a far one.
    action_label_sigma: float = 0.0
    task_weights: dict[str, float] = field(default_factory=dict)  # task -> weight, default 1
    # -- what the model reads and writes (the data side reads these instead of repeating them)
    history: int = 1  # frames in the observation
    horizon: int = 10  # action chunk length H
    use_state: bool = True  # put the ego state tokens in the policy prompt
    # The policy's prompts hold the frame(s) of history (the default). False: the policy (with or without its
    # reasoning) reads the instruction and the ego state only, in training and when it drives; the world task
    # still reads and predicts frames, so the backbone is still the world model.
    policy_frames: bool = True
    state_dims: int | None = None  # the first N state values only (3: the ego's own, no nearby vehicles); None: all
    # No gradient reaches the state bins' input embeddings: they stay where `ordinal_init` put them (one line per
    # state dimension, bin i at base + c_i * direction; weight decay shrinks them all alike), and training moves
    # the layers that read them, so the model reads a state value through one fixed direction shared by all its
    # bins and what it learns for one value carries to its neighbours. Learned rows (the default) are each moved
    # by their own few samples.
    fixed_state_embedding: bool = False
    # Each state token's input embedding also gets its value times a learned direction of its dimension
    # (c * w_d, c from -1 to 1 over the dimension's bins): the state read as a number, as a state MLP reads it, one
    # direction per dimension learned from every sample of that dimension, beside the per-bin rows. An export folds
    # c * w_d into the rows, so exported models are plain embeddings.
    state_value_embedding: bool = False
    max_reason_tokens: int = 48  # cap on generated reasoning
    # The operator questions' scratchpad in its inductive form: each step written from the question and the step
    # before it only, at positions that restart after the question (`sequences.build_text`); generation does the
    # same (`eval.operators`). Needs shards tokenized with the steps apart and a tokenizer with the <step> marker.
    inductive_scratchpad: bool = False
    # The driving policy's reasoning in the same form: the causation sentence's cause and decision as two steps and
    # the action chunk as a third, each written from the observation and the step before it only
    # (`sequences._inductive_reason`, `Policy.act`). Needs shards with `reason_step_rows` and attention=sdpa.
    inductive_reason: bool = False
    # -- optional continuous action head beside the discrete action tokens
    action_head: bool = False  # a small bidirectional transformer over H learned queries, trained with L1
    action_head_layers: int = 2
    action_head_weight: float = 1.0  # weight of its L1 loss (on actions normalised to [-1, 1])
    # The head also reads the ego state as continuous values (normalised over the state tokenizer's range, added to
    # every query through a small MLP), as a VLA's action expert reads proprioception beside the backbone's features.
    action_head_state: bool = False
    # Standardise those values before the head reads them (their mean and standard deviation over the training
    # rows, set by `unified train` and kept in the head's weights), as the state-only baseline reads its state:
    # over the range a small correction hardly moves the input (docs/driving.md, round 17).
    action_head_standardize: bool = False
    # The state's own path to the chunk: an MLP (two hidden layers) from the state to the H x D values, added to
    # what the decoder writes from the prompt, whose output starts at zero; so the head starts as the state-only
    # baseline's network and the prompt (instruction, frame, reasoning) adds to it. Without it the state is added
    # to the decoder's queries.
    action_head_state_mlp: bool = False
    action_dim: int = 2
    # How an action chunk is written: "bins" (one token per dimension per step, all steps decoded together) or
    # "fast" (the FAST tokenizer's DCT + BPE tokens, a variable number per chunk, decoded until `</act>`).
    action_tokens: str = "bins"

    def __post_init__(self):
        if self.action_tokens not in ACTION_TOKENS:
            raise UnifiedError(f"model.action_tokens: expected one of {', '.join(ACTION_TOKENS)}, got "
                               f"{self.action_tokens!r}")
        if self.action_tokens == "fast" and self.action_label_sigma > 0:
            raise UnifiedError("model.action_label_sigma spreads targets over neighbouring bins; FAST tokens have no "
                               "neighbours: leave it 0 with model.action_tokens: fast")
        if self.fixed_state_embedding and self.state_value_embedding:
            raise UnifiedError("model.fixed_state_embedding and model.state_value_embedding are two ways of reading "
                               "the state bins; choose one")
        if not self.policy_frames and not self.use_state:
            raise UnifiedError("model.policy_frames: false leaves the policy the instruction alone; it needs "
                               "model.use_state: true")
        if self.action_head_state and not self.action_head:
            raise UnifiedError("model.action_head_state: true needs model.action_head: true (it is that head's input)")
        if self.action_head_state_mlp and not self.action_head_state:
            raise UnifiedError("model.action_head_state_mlp: true is the head's path from the state; it needs "
                               "model.action_head_state: true")
        if self.action_head_standardize and not self.action_head_state:
            raise UnifiedError("model.action_head_standardize: true standardises the state the head reads; it needs "
                               "model.action_head_state: true")
        unknown = sorted(set(self.task_weights) - set(TASKS))
        if unknown:
            raise UnifiedError(f"model.task_weights: unknown task(s) {unknown}; tasks are {', '.join(TASKS)}")
        if self.action_label_sigma < 0:
            raise UnifiedError(f"model.action_label_sigma is a width in bins, at least 0; got "
                               f"{self.action_label_sigma}")
        if self.hidden_size % self.num_heads:
            raise UnifiedError(f"model: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")


def backbone_config(config: ModelConfig, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads or config.num_heads,
        intermediate_size=config.intermediate_size, max_position_embeddings=config.max_position_embeddings,
        rope_theta=config.rope_theta, tie_word_embeddings=False, attn_implementation="sdpa",
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def build_backbone(config: ModelConfig, layout: TokenLayout):
    """A fresh Llama-family LM, or the one in `init_from` with its text embeddings moved to the layout's text rows."""
    from transformers import AutoModelForCausalLM

    if config.init_from is None:
        return AutoModelForCausalLM.from_config(backbone_config(config, layout.vocab_size), attn_implementation="sdpa")
    try:
        lm = AutoModelForCausalLM.from_pretrained(config.init_from, local_files_only=True, attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise UnifiedError(f"model.init_from {config.init_from}: no pretrained LM could be loaded ({e})") from None
    text = layout.segment("text")
    old_in = lm.get_input_embeddings().weight.data.clone()
    old_out = lm.get_output_embeddings().weight.data.clone()
    if text.size > old_in.shape[0]:
        raise UnifiedError(f"model.init_from: the layout's text segment ({text.size}) is larger than the LM's "
                           f"vocabulary ({old_in.shape[0]}); fit the tokenizers with --text-from {config.init_from}")
    lm.resize_token_embeddings(layout.vocab_size, mean_resizing=True)
    # The LM's token i is the layout's text token i, i.e. global id text.start + i.
    lm.get_input_embeddings().weight.data[text.start:text.stop] = old_in[:text.size]
    lm.get_output_embeddings().weight.data[text.start:text.stop] = old_out[:text.size]
    lm.config.vocab_size = layout.vocab_size
    return lm


@torch.no_grad()
def ordinal_init(model: UnifiedModel, segment: str, block: int, seed: int = 0) -> None:
    """Start the input embeddings of a binned segment ordered: in every block of `block` bins (one dimension's bins)
    the rows lie on a line, bin i at base + c_i * direction with c_i from -1 to 1, so that neighbouring bins start
    alike. A fresh model otherwise starts every bin unrelated to the next and has to learn from data alone that 12 m
    and 13 m are close, which a short budget never teaches it for rare values. (Not the output embeddings: logits
    linear in c_i would start every prediction at one end of the range.)"""
    span = model.layout.segment(segment)
    if span.size % block:
        raise UnifiedError(f"ordinal_init: segment {segment!r} of {span.size} ids is not made of blocks of {block}")
    generator = torch.Generator().manual_seed(seed)
    position = torch.linspace(-1.0, 1.0, block)[:, None]  # (block, 1)
    matrix = model.backbone.get_input_embeddings().weight
    std = float(matrix[span.start:span.stop].std())
    for k in range(span.size // block):
        base, direction = (torch.randn(2, matrix.shape[1], generator=generator) * std).to(matrix)
        matrix[span.start + k * block:span.start + (k + 1) * block] = base + position.to(matrix) * direction


def state_network(inputs: int, outputs: int, hidden: int) -> nn.Sequential:
    """Two hidden GELU layers from the state to the actions: the state-only baseline's network, and the continuous
    head's own path from the state (`model.action_head_state_mlp`)."""
    return nn.Sequential(nn.Linear(inputs, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, outputs))


class ActionHead(nn.Module):
    """H learned queries attend to each other (bidirectionally) and to the backbone's hidden states of the
    prompt; each query becomes one step of the chunk, in normalised units ([-1, 1] over the action tokenizer's
    range). With `state_size`, the normalised ego state is embedded by an MLP and added to every query; with
    `standardize` as well, it is first standardised by the buffers `state_mean` and `state_std` (saved with the
    head's weights; `set_state_stats` sets them from the training rows). With `state_mlp`, the state goes its own
    way instead: an MLP from it to the chunk, added to the decoder's output (which then starts at zero)."""

    def __init__(self, hidden: int, horizon: int, action_dim: int, layers: int, heads: int, state_size: int = 0,
                 standardize: bool = False, state_mlp: bool = False):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(horizon, hidden) * 0.02)
        if state_mlp and not state_size:
            raise UnifiedError("the action head's state path needs the state (state_size 0)")
        self.state_in = nn.Sequential(nn.Linear(state_size, hidden), nn.GELU(), nn.Linear(hidden, hidden)) \
            if state_size and not state_mlp else None
        self.state_out = state_network(state_size, horizon * action_dim, hidden) if state_mlp else None
        self.state_size = state_size
        if standardize:
            if not state_size:
                raise UnifiedError("the action head standardises the state it reads, but reads none (state_size 0)")
            self.register_buffer("state_mean", torch.zeros(state_size))
            self.register_buffer("state_std", torch.ones(state_size))
        self.standardize = standardize
        def block():
            return nn.TransformerDecoderLayer(hidden, heads, 2 * hidden, dropout=0.0, batch_first=True,
                                              norm_first=True)

        layer = block()
        self.blocks = nn.TransformerDecoder(layer, layers)  # deep copies of `layer`
        # Built inside deepspeed.zero.Init (ZeRO-3), each module's parameters are partitioned as its __init__ ends;
        # deep copies escape that, so the blocks are built one by one there instead.
        partitioned = hasattr(layer.linear1.weight, "ds_id")
        if partitioned:
            self.blocks.layers = nn.ModuleList(block() for _ in range(layers))
        self.out = nn.Linear(hidden, action_dim)
        if state_mlp:  # the prompt's part starts at zero: the head starts as the state's network alone
            import contextlib

            gathered = contextlib.nullcontext()
            if partitioned:  # a partitioned parameter is set through its gathered whole
                import deepspeed

                gathered = deepspeed.zero.GatheredParameters([self.out.weight, self.out.bias], modifier_rank=0)
            with gathered:
                nn.init.zeros_(self.out.weight)
                nn.init.zeros_(self.out.bias)

    def forward(self, memory: torch.Tensor, padding: torch.Tensor, states: torch.Tensor | None = None) -> torch.Tensor:
        """memory (S, P, C) hidden states, padding (S, P) True where empty, states (S, K) normalised ego states (for
        a head built with `state_size`) -> (S, H, D) normalised actions."""
        queries = self.queries.unsqueeze(0).expand(len(memory), -1, -1)
        if self.state_size:
            if states is None or states.shape[-1] != self.state_size:
                raise UnifiedError(f"the action head reads {self.state_size} state values, got "
                                   f"{None if states is None else tuple(states.shape)}")
            if self.standardize:
                states = (states.to(self.state_mean.dtype) - self.state_mean) / self.state_std
            states = states.to(queries.dtype)
            if self.state_in is not None:
                queries = queries + self.state_in(states).unsqueeze(1)
        # Linear output: a tanh here saturates early in training and its gradient vanishes; callers clip.
        out = self.out(self.blocks(queries, memory, memory_key_padding_mask=padding))
        if self.state_out is not None:
            out = out + self.state_out(states).view(out.shape)
        return out

    def set_state_stats(self, states: np.ndarray) -> None:
        """Standardise by the mean and standard deviation of `states` (N, K), the normalised values the head reads,
        over the training rows."""
        if not self.standardize:
            raise UnifiedError("this action head does not standardise its state (model.action_head_standardize)")
        states = np.asarray(states, np.float64)
        if states.ndim != 2 or states.shape[1] != len(self.state_mean) or len(states) < 2:
            raise UnifiedError(f"the action head's state statistics need (N >= 2, {len(self.state_mean)}) values, "
                               f"got {states.shape}")
        with torch.no_grad():
            self.state_mean.copy_(torch.from_numpy(states.mean(0)))
            # A value that (almost) never moves in training is divided by 0.01 at most, not by its zero spread.
            self.state_std.copy_(torch.from_numpy(np.maximum(states.std(0), 1e-2)))


def state_values(state_dim: int, config: ModelConfig) -> int:
    """How many of a state tokenizer's `state_dim` values the model reads (`config.state_dims`: the first N)."""
    return len(range(state_dim)[:config.state_dims])


def gather_prompts(hidden: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (B, T, C), index (S, 3) rows of [row, start, last] -> (S, P, C) memory and (S, P) padding mask."""
    lengths = index[:, 2] - index[:, 1] + 1
    p = int(lengths.max())
    offsets = torch.arange(p, device=hidden.device)
    positions = (index[:, 1:2] + offsets).clamp_max(hidden.shape[1] - 1)  # (S, P)
    memory = hidden[index[:, 0:1], positions]  # (S, P, C)
    return memory, offsets[None] >= lengths[:, None]


def block_mask(segment: torch.Tensor, action_block: torch.Tensor):
    """The packed rows' attention rule (`unified.packing.attention_mask`: causal within a sample, no action block
    seeing another of its chunk, padding on itself) as a flex-attention `BlockMask` built on the ids' device from
    the (B, T) segments and action blocks, so that no (B, 1, T, T) tensor exists and fully masked blocks are
    skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    def rule(b, h, q, kv):
        same = (segment[b, q] == segment[b, kv]) & (segment[b, q] >= 0)
        other = (action_block[b, q] >= 0) & (action_block[b, kv] >= 0) & (action_block[b, q] != action_block[b, kv])
        return (same & (kv <= q) & ~other) | (q == kv)

    batch, length = segment.shape
    return create_block_mask(rule, batch, None, length, length, device=segment.device)


class UnifiedModel(nn.Module):
    """`forward(batch) -> (loss, metrics)` for training; `logits` for generation."""

    def __init__(self, config: ModelConfig, layout: TokenLayout, backbone=None, state_dim: int = 0):
        """`state_dim`: how many values the state tokenizer writes (needed by a head that reads the state, which
        gets `state_values(state_dim, config)` of them, and by `state_value_embedding`)."""
        super().__init__()
        self.config, self.layout = config, layout
        self.backbone = backbone if backbone is not None else build_backbone(config, layout)
        if self.backbone.config.vocab_size != layout.vocab_size:
            raise UnifiedError(
                f"the backbone has a vocabulary of {self.backbone.config.vocab_size}, the token layout "
                f"{layout.vocab_size}: the checkpoint and the tokenizers do not belong together"
            )
        if config.action_tokens == "fast" and not layout.has("fast"):
            raise UnifiedError("model.action_tokens: fast needs a token layout with a fast segment "
                               "(`Tokenizers.layout_for('fast')`)")
        self.register_buffer("image_ids", torch.from_numpy(layout.mask("image")), persistent=False)
        self.state_value = None
        if config.state_value_embedding:
            span = layout.segment("state") if layout.has("state") else None
            if span is None or state_dim < 1 or span.size % state_dim:
                raise UnifiedError(f"model.state_value_embedding: needs the state tokenizer's number of values and a "
                                   f"layout with a state segment made of that many blocks of bins (state_dim "
                                   f"{state_dim}, segment {None if span is None else span.size})")
            self.state_value = nn.Parameter(torch.zeros(state_dim, self.backbone.config.hidden_size))
        self.action_head = None
        if config.action_head:
            state_size = state_values(state_dim, config) if config.action_head_state else 0
            if config.action_head_state and state_size < 1:
                raise UnifiedError("model.action_head_state: the head reads the state but was given no state size")
            self.action_head = ActionHead(self.backbone.config.hidden_size, config.horizon, config.action_dim,
                                          config.action_head_layers, self.backbone.config.num_attention_heads,
                                          state_size, config.action_head_standardize, config.action_head_state_mlp)

    @property
    def action_segment(self):
        """The ids this model writes actions with: the action bins, or the FAST tokens."""
        return self.layout.segment("fast" if self.config.action_tokens == "fast" else "action")

    def spread_action_targets(self, bins: int) -> None:
        """Build the soft targets of `action_label_sigma` for action tokenizers of `bins` bins per dimension: row i is
        the target distribution over the action segment when the recorded token is its id i, a Gaussian over the
        bins of i's own dimension."""
        span = self.layout.segment("action")
        if span.size % bins:
            raise UnifiedError(f"action_label_sigma: the action segment of {span.size} ids is not made of blocks of "
                               f"{bins} bins")
        ids = torch.arange(span.size)
        same = (ids[:, None] // bins) == (ids[None] // bins)
        kernel = torch.exp(-0.5 * ((ids[:, None] - ids[None]).float() / self.config.action_label_sigma) ** 2) * same
        self.register_buffer("action_targets", kernel / kernel.sum(1, keepdim=True), persistent=False)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def logits(self, input_ids, attention_mask=None, position_ids=None, cache=None, hidden: bool = False):
        """(B, T) ids, (B, 1, T, T_kv) bool mask (SDPA) or a flex-attention `BlockMask` (see `block_mask`) ->
        ((B, T, V) logits, cache), plus the (B, T, C) last hidden states when `hidden`."""
        kernel = self.backbone.config._attn_implementation
        flex = type(attention_mask).__name__ == "BlockMask"
        if flex:
            self.backbone.set_attn_implementation("flex_attention")
        inputs = {"input_ids": input_ids}
        if self.config.fixed_state_embedding:
            inputs = {"inputs_embeds": self._embed_fixed_state(input_ids)}
        elif self.state_value is not None:
            inputs = {"inputs_embeds": self.backbone.get_input_embeddings()(input_ids) + self._value_embeds(input_ids)}
        try:
            out = self.backbone(
                **inputs, attention_mask=attention_mask, position_ids=position_ids,
                cache=cache, use_cache=cache is not None, output_hidden_states=hidden,
            )
        finally:
            if flex:
                self.backbone.set_attn_implementation(kernel)
        if hidden:
            return out.logits, out.cache, out.hidden_states[-1]
        return out.logits, out.cache

    def _state_offsets(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each id's offset in the state segment (clamped into it) and whether it is a state token."""
        span = self.layout.segment("state")
        offset = input_ids - span.start
        return offset.clamp(0, span.size - 1), (offset >= 0) & (offset < span.size)

    def _embed_fixed_state(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The input embeddings of `input_ids`, with no gradient through the rows of the state bins
        (`fixed_state_embedding`)."""
        embeds = self.backbone.get_input_embeddings()(input_ids)
        return torch.where(self._state_offsets(input_ids)[1].unsqueeze(-1), embeds.detach(), embeds)

    def _value_embeds(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(..., C): c * w_d at the state tokens (c from -1 to 1 over the bins of dimension d), 0 elsewhere."""
        offset, is_state = self._state_offsets(input_ids)
        bins = self.layout.segment("state").size // len(self.state_value)
        value = (offset % bins).to(self.state_value.dtype) * (2.0 / max(bins - 1, 1)) - 1.0
        return (value * is_state).unsqueeze(-1) * self.state_value[offset // bins]

    @torch.no_grad()
    def folded_embeddings(self) -> torch.Tensor:
        """The input embedding matrix with `state_value_embedding`'s c * w_d added to the state rows: what an
        export writes, so that the plain backbone computes what this model does."""
        weight = self.backbone.get_input_embeddings().weight.detach()
        if self.state_value is None:
            return weight
        span = self.layout.segment("state")
        folded = weight.clone()
        folded[span.start:span.stop] += self._value_embeds(torch.arange(span.start, span.stop, device=weight.device))
        return folded

    def continuous_actions(self, hidden: torch.Tensor, index: torch.Tensor,
                           states: torch.Tensor | None = None) -> torch.Tensor:
        """(S, H, D) normalised actions from the hidden states of each policy prompt (see `gather_prompts`) and,
        for a head that reads it, the (S, K) normalised ego states."""
        if self.action_head is None:
            raise UnifiedError("this model has no continuous action head (model.action_head: false)")
        return self.action_head(*gather_prompts(hidden, index), states)

    def _spread_action_ce(self, logits: torch.Tensor, targets: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
        """`ce` with the action positions' cross-entropy taken against the spread targets instead."""
        if getattr(self, "action_targets", None) is None:
            raise UnifiedError("model.action_label_sigma > 0: call spread_action_targets(bins) before training")
        span = self.layout.segment("action")
        hit = (targets >= span.start) & (targets < span.stop)
        if not hit.any():
            return ce
        logp = F.log_softmax(logits[hit], -1)[:, span.start:span.stop]  # (N, A)
        soft = self.action_targets[targets[hit] - span.start]  # (N, A)
        return ce.masked_scatter(hit, -(soft * logp).sum(-1))

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Weighted cross-entropy on the target spans of a packed batch (see `packing.Batch.to_torch`), plus the
        continuous head's L1 when the model has one.

        With a teacher's soft targets in the batch (`soft_index` (N, 2), `soft_logprobs` (N, A) over the action
        bins, `distill` = [ce_weight, kl_weight, temperature]; see `unified.distill`) the loss is
        ce_weight * cross-entropy + kl_weight * KL(teacher || student) on those positions."""
        use_head = self.action_head is not None and len(batch.get("head_index", ())) > 0
        mask = block_mask(batch["segment"], batch["action_block"]) if "segment" in batch else batch["attention_mask"]
        out = self.logits(batch["input_ids"], mask, batch["position_ids"], hidden=use_head)
        logits = out[0].float()
        targets, weights = batch["targets"], batch["weights"]
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
        ce = ce.view_as(targets)  # (B, T), 0 where targets == IGNORE
        if self.config.action_label_sigma > 0:
            ce = self._spread_action_ce(logits, targets, ce)
        total_weight = weights.sum().clamp_min(1e-8)
        loss = (ce * weights).sum() / total_weight
        metrics = {}
        if "soft_logprobs" in batch:
            ce_weight, kl_weight, temperature = (float(v) for v in batch["distill"])
            index, action = batch["soft_index"], self.action_segment
            student = F.log_softmax(logits[index[:, 0], index[:, 1], action.start:action.stop] / temperature, -1)
            kl = F.kl_div(student, batch["soft_logprobs"], log_target=True, reduction="batchmean")
            loss = ce_weight * loss + kl_weight * kl
            metrics["loss/distill_kl"] = kl.detach()
        if self.config.z_loss:
            log_z = torch.logsumexp(logits, -1)
            has_target = targets != IGNORE
            z = (log_z.square() * has_target).sum() / has_target.sum().clamp_min(1)
            loss = loss + self.config.z_loss * z
            metrics["z_loss"] = z.detach()
        with torch.no_grad():
            has_target = targets != IGNORE
            correct = (logits.argmax(-1) == targets) & has_target
            for k, task in enumerate(TASKS):
                in_task = has_target & (batch["task_ids"] == k)
                n = in_task.sum()
                if n > 0:
                    metrics[f"loss/{task}"] = (ce * in_task).sum() / n
                    metrics[f"accuracy/{task}"] = (correct & in_task).sum() / n
            metrics["tokens"] = has_target.sum()
        if use_head:
            predicted = self.continuous_actions(out[2], batch["head_index"], batch.get("head_states"))
            l1 = F.l1_loss(predicted.float(), batch["head_targets"])
            loss = loss + self.config.action_head_weight * l1
            metrics["loss/action_head_l1"] = l1.detach()
        return loss, metrics
