"""Decision Transformer action selection for batched rollouts: KV-cached incremental, and windowed.

:class:`CachedDTRollout` drives a ``transformers.DecisionTransformerModel``'s GPT-2 encoder one
environment step at a time with a KV cache: each :meth:`~CachedDTRollout.act` feeds the previous
step's action token (from step 1 on) and this step's return-to-go and state tokens, and predicts the
action from the state token's hidden state. The cache is created by the encoder on the first step, so
a memory policy attached with ``namm_transfer.adapters.attach(model, policy)`` manages it (this module
does not import the adapters: it only passes ``past_key_values`` along). With a full cache the
predictions equal ``model(...)`` on the whole episode so far.

:class:`WindowedDTRollout` is the standard reference (Chen et al. 2021): every step re-encodes the
last ``context`` steps with ``model(...)``, the current action slot a zero placeholder.

Both step ``B`` episodes together; episodes that finished early can keep being fed anything (their
last observation, say) and their predictions ignored: samples never attend to each other, and memory
policies decide per sample.

Token layout (as in ``DecisionTransformerModel.forward``): ``R_0, s_0, a_0, R_1, s_1, a_1, ...``;
each token is its modality's embedding plus the timestep embedding, then ``embed_ln``; the encoder
gets all-zero position ids (time enters only through the timestep embedding), so the GPT-2 position
embedding adds the same vector to every token and cached keys never depend on where a token sits.
The arrival index of a token (what an evicting cache records per slot) is ``3 * step + kind``, see
:func:`token_kind_and_step`.
"""

from __future__ import annotations

from typing import Any

import torch

RETURN, STATE, ACTION = 0, 1, 2
TOKENS_PER_STEP = 3


def token_kind_and_step(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Arrival indices (``LayerMemory.positions``) -> (kind: RETURN/STATE/ACTION, step of the episode)."""
    return positions % TOKENS_PER_STEP, positions // TOKENS_PER_STEP


class _DTRollout:
    """Input handling shared by the two rollouts: device/dtype conversion and shape checks."""

    def __init__(self, model: torch.nn.Module):
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) != "decision_transformer":
            raise TypeError(
                f"expected a transformers DecisionTransformerModel, got a {type(model).__name__} "
                f"(model_type={getattr(config, 'model_type', None)!r})"
            )
        self.model = model
        self.state_dim, self.act_dim = int(config.state_dim), int(config.act_dim)
        self.max_ep_len = int(config.max_ep_len)
        self.batch_size: int | None = None

    @property
    def _device(self) -> torch.device:
        return self.model.embed_state.weight.device

    @property
    def _dtype(self) -> torch.dtype:
        return self.model.embed_state.weight.dtype

    def _inputs(self, states: Any, returns_to_go: Any, timesteps: Any):
        states = torch.as_tensor(states, dtype=self._dtype, device=self._device)
        if states.ndim != 2 or states.shape[-1] != self.state_dim:
            raise ValueError(f"states must be [B, {self.state_dim}], got {tuple(states.shape)}")
        batch = states.shape[0]
        if self.batch_size is None:
            self.batch_size = batch
        elif batch != self.batch_size:
            raise ValueError(f"this batch has {self.batch_size} episodes, got {batch} states; call reset()")
        returns_to_go = torch.as_tensor(returns_to_go, dtype=self._dtype, device=self._device)
        if returns_to_go.numel() not in (1, batch) or returns_to_go.ndim > 2:
            shape = tuple(returns_to_go.shape)
            raise ValueError(f"returns_to_go must be [B] or [B, 1] with B={batch}, got {shape}")
        returns_to_go = returns_to_go.reshape(-1, 1).expand(batch, 1)
        timesteps = torch.as_tensor(timesteps, dtype=torch.long)
        if timesteps.numel() not in (1, batch) or timesteps.ndim > 1:
            shape = tuple(timesteps.shape)
            raise ValueError(f"timesteps must be [B] or a scalar with B={batch}, got {shape}")
        timesteps = timesteps.reshape(-1).expand(batch)
        low, high = int(timesteps.min()), int(timesteps.max())
        if low < 0 or high >= self.max_ep_len:
            raise ValueError(
                f"timesteps must lie in [0, max_ep_len={self.max_ep_len}) (the timestep embedding's size), "
                f"got [{low}, {high}]"
            )
        return states, returns_to_go, timesteps.to(self._device)

    def _actions(self, actions: Any) -> torch.Tensor:
        actions = torch.as_tensor(actions, dtype=self._dtype, device=self._device)
        if actions.shape != (self.batch_size, self.act_dim):
            expected = (self.batch_size, self.act_dim)
            raise ValueError(f"actions must be [B, act_dim] = {list(expected)}, got {list(actions.shape)}")
        return actions


class CachedDTRollout(_DTRollout):
    """KV-cached incremental action selection for ``B`` episodes stepping together.

    Per environment step: ``action = rollout.act(states, returns_to_go, timesteps)``; the predicted
    action is what the next step feeds as this step's action token, unless :meth:`record_action`
    replaces it (the action actually executed, or a dataset's action for teacher forcing).

    Args:
        model: a ``DecisionTransformerModel`` in eval mode, a memory policy attached or not.

    Attributes:
        cache: the encoder's cache (an ``EvictingCache`` when a policy is attached, else a
            ``DynamicCache``), None before the first step.
        tokens_fed: tokens fed into the cache so far (``3 * steps - 1`` after ``steps`` steps).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.reset()

    def reset(self) -> None:
        """Start new episodes: drop the cache (a policy's per-layer state lives in it)."""
        self.cache = None
        self.batch_size = None
        self.steps = 0
        self.tokens_fed = 0
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (action [B, A], its timestep [B])

    def _embed(self, tokens: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """``[(embedding layer, input [B, d], timesteps [B]), ...]`` -> ``[B, n, hidden]`` after embed_ln."""
        model = self.model
        embedded = [embed(x) + model.embed_timestep(t) for embed, x, t in tokens]
        return model.embed_ln(torch.stack(embedded, dim=1))

    @torch.no_grad()
    def act(self, states: Any, returns_to_go: Any, timesteps: Any) -> torch.Tensor:
        """Feed this step and predict its action.

        Args:
            states: ``[B, state_dim]`` (normalised as the model was trained).
            returns_to_go: ``[B]`` or ``[B, 1]`` (scaled as the model was trained).
            timesteps: ``[B]`` or a scalar, each ``< config.max_ep_len``.

        Returns:
            ``[B, act_dim]`` predicted actions (model dtype, model device).
        """
        states, returns_to_go, timesteps = self._inputs(states, returns_to_go, timesteps)
        model = self.model
        tokens = []
        if self._pending is not None:
            action, action_t = self._pending
            tokens.append((model.embed_action, action, action_t))
        tokens += [(model.embed_return, returns_to_go, timesteps), (model.embed_state, states, timesteps)]
        inputs = self._embed(tokens)
        batch, n_new = inputs.shape[:2]
        out = model.encoder(
            inputs_embeds=inputs,
            past_key_values=self.cache,
            position_ids=torch.zeros(batch, n_new, dtype=torch.long, device=inputs.device),
            use_cache=True,
        )
        self.cache = out.past_key_values
        self.steps += 1
        self.tokens_fed += n_new
        action = model.predict_action(out.last_hidden_state[:, -1])
        self._pending = (action, timesteps)
        return action

    def record_action(self, actions: Any) -> None:
        """Replace the action token the next step feeds for the step just taken (``[B, act_dim]``)."""
        if self._pending is None:
            raise RuntimeError("record_action() before any act(): there is no step to record an action for")
        self._pending = (self._actions(actions), self._pending[1])

    def stored_tokens(self) -> list[int]:
        """Token slots physically stored per layer (the largest count over samples and heads)."""
        if self.cache is None:
            return []
        return [
            layer.stored_slots() if hasattr(layer, "stored_slots")
            else 0 if layer.keys is None else int(layer.keys.shape[-2])
            for layer in self.cache.layers
        ]


class WindowedDTRollout(_DTRollout):
    """The standard reference: each step re-encodes the last ``context`` steps with ``model(...)``.

    No KV cache and no padding: while fewer than ``context`` steps exist, the window is the whole
    episode so far (left-padding to ``context`` with a zero attention mask, as the original
    evaluation does, gives the same predictions up to rounding).

    Args:
        model: a ``DecisionTransformerModel`` in eval mode.
        context: steps per window (the ``K`` the model was trained with).
    """

    def __init__(self, model: torch.nn.Module, context: int):
        super().__init__(model)
        if context < 1:
            raise ValueError(f"context must be >= 1 step, got {context}")
        self.context = context
        self.reset()

    def reset(self) -> None:
        self.batch_size = None
        self.steps = 0
        self._states: list[torch.Tensor] = []
        self._returns: list[torch.Tensor] = []
        self._timesteps: list[torch.Tensor] = []
        self._actions_taken: list[torch.Tensor] = []

    @torch.no_grad()
    def act(self, states: Any, returns_to_go: Any, timesteps: Any) -> torch.Tensor:
        """Same contract as :meth:`CachedDTRollout.act`."""
        states, returns_to_go, timesteps = self._inputs(states, returns_to_go, timesteps)
        k = self.context
        self._states = (self._states + [states])[-k:]
        self._returns = (self._returns + [returns_to_go])[-k:]
        self._timesteps = (self._timesteps + [timesteps])[-k:]
        placeholder = torch.zeros(states.shape[0], self.act_dim, dtype=self._dtype, device=self._device)
        self._actions_taken = (self._actions_taken + [placeholder])[-k:]
        window = len(self._states)
        out = self.model(
            states=torch.stack(self._states, dim=1),
            actions=torch.stack(self._actions_taken, dim=1),
            returns_to_go=torch.stack(self._returns, dim=1),
            timesteps=torch.stack(self._timesteps, dim=1),
            attention_mask=torch.ones(states.shape[0], window, dtype=torch.long, device=self._device),
            return_dict=True,
        )
        action = out.action_preds[:, -1]
        self._actions_taken[-1] = action
        self.steps += 1
        return action

    def record_action(self, actions: Any) -> None:
        """Replace the latest step's action in the window (``[B, act_dim]``)."""
        if not self._actions_taken:
            raise RuntimeError("record_action() before any act(): there is no step to record an action for")
        self._actions_taken[-1] = self._actions(actions)
