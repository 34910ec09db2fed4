# ruff: noqa: E501 - the chat templates are kept as the model files carry them
"""Tiny llama-architecture GGUF models with real tokenizers and seeded random weights.

The tokenizer (vocabulary, merges, special tokens, BOS flag) is copied from llama.cpp's
vocab-only test models (`models/ggml-vocab-*.gguf` of the vendored source), so prompts are
tokenized exactly as a real Qwen2 or Llama 3 model's are. The weights are random (seeded), with
token preferences written into them so answers are predictable:

- one hidden dimension is a constant (column 0 of the embeddings; the attention and FFN outputs
  never write it), so after the final norm it acts as a bias input to the output layer;
- the output row of `"` gets a large weight on it: under a grammar (ours, or llama-server's
  tool-call grammar) every JSON string is closed at once, so a complete call comes out in a few
  dozen tokens; without a grammar the model writes quotes;
- the end-of-generation tokens get a negative weight on it: without a grammar the model never
  stops by itself (it runs to n_predict, a LENGTH stop); under a grammar they are chosen once
  the grammar is complete, because nothing else is allowed then.

A model may also rename tokens and prefer tokens more or less than `"` (`Tuning.prefer`, on the
constant dimension), and prefer a token right after another (`Tuning.after`): a second constant
dimension is set only in the embedding of the first token, and only the second token's output
row reads it (one dimension per pair). "qwen-calls" uses both to answer a call in the Hermes
format llama-server's tool-call grammar expects: its vocabulary has Qwen2.5's
`<tool_call>`/`</tool_call>` tokens (ids 151657/151658, two padding tokens of the Qwen2
vocabulary renamed), `<tool_call>` follows a line break (the generation prompt's last token, so
the answer opens a call at once instead of writing text before it, which that grammar allows), a
line break follows it (the grammar's `<tool_call>\n`: without it `<tool_call>` is still free
text to that grammar), `</tool_call>` closes the call, and `<|im_end|>` follows it (one call,
then the turn ends).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_FF = 128
N_CTX_TRAIN = 4096
CONSTANT = 4.0

# A Qwen2.5-style template with tool support (the Hermes <tool_call> format llama.cpp detects).
QWEN_TOOLS_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# A Llama 3-style template that knows nothing of tools (they never reach the prompt).
LLAMA3_PLAIN_TEMPLATE = """{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""


@dataclass(frozen=True)
class Tuning:
    """Token preferences beyond the defaults (see the module docstring)."""

    rename: tuple[tuple[int, str], ...] = ()  # (token id, new text): give a vocabulary a token
    prefer: tuple[tuple[str, float], ...] = ()  # (token, weight on the constant dimension)
    after: tuple[tuple[str, str], ...] = ()  # (token, the token preferred right after it)


QWEN_CALLS = Tuning(
    rename=((151657, "<tool_call>"), (151658, "</tool_call>")),
    prefer=(("</tool_call>", 2.0),),  # below `"`: strings still close at once
    # "Ċ" is the line break in the byte-level BPE vocabulary (token 198, "\n"): the generation
    # prompt ends with one, so the answer opens with <tool_call> (inside a call the grammar
    # allows no <tool_call> after a line break, and no preference on the constant dimension
    # competes with `"` in strings).
    after=(("Ċ", "<tool_call>"), ("<tool_call>", "Ċ"), ("</tool_call>", "<|im_end|>")),
)

# A model that answers "Hello, I am Sam." and stops by itself (each token follows the one
# before; "ĊĊ", two line breaks, ends the Llama 3 generation prompt): text with a STOP finish,
# as a model answers whose template puts no tools in the prompt.
LLAMA3_CHAT = Tuning(
    after=(
        ("ĊĊ", "Hello"), ("Hello", ","), (",", "ĠI"), ("ĠI", "Ġam"), ("Ġam", "ĠSam"),
        ("ĠSam", "."), (".", "<|eot_id|>"),
    )
)  # fmt: skip

MODELS: dict[str, tuple[str, str, Tuning]] = {
    # name: (vocab file, chat template, extra token preferences)
    "qwen-tools": ("ggml-vocab-qwen2.gguf", QWEN_TOOLS_TEMPLATE, Tuning()),
    "llama3-plain": ("ggml-vocab-llama-bpe.gguf", LLAMA3_PLAIN_TEMPLATE, Tuning()),
    "qwen-calls": ("ggml-vocab-qwen2.gguf", QWEN_TOOLS_TEMPLATE, QWEN_CALLS),
    "llama3-chat": ("ggml-vocab-llama-bpe.gguf", LLAMA3_PLAIN_TEMPLATE, LLAMA3_CHAT),
}
_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|im_start|>")


def _field_value(field: Any) -> Any:
    return field.contents()


def make_model(
    vocab_path: Path, template: str, out: Path, *, seed: int = 14, tuning: Tuning = Tuning()
) -> None:
    reader = gguf.GGUFReader(str(vocab_path))
    tokens = [str(t) for t in _field_value(reader.fields["tokenizer.ggml.tokens"])]
    for token_id, text in tuning.rename:
        tokens[token_id] = text
    n_vocab = len(tokens)
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(f"tiny-{out.stem}")
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.") or key == "tokenizer.chat_template":
            continue
        types = field.types
        value = tokens if key == "tokenizer.ggml.tokens" else _field_value(field)
        if types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, types[0], sub_type=types[1])
        else:
            writer.add_key_value(key, value, types[0])
    writer.add_chat_template(template)

    rng = np.random.default_rng(seed)

    def rand(*shape: int, scale: float = 0.05) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    embd = rand(n_vocab, N_EMBD)
    embd[:, 0] = CONSTANT
    output = rand(n_vocab, N_EMBD)
    output[:, 0] = 0.0
    index = {t: i for i, t in enumerate(tokens)}
    output[index['"'], 0] = 3.0
    for end in _END_TOKENS:
        if end in index:
            output[index[end], 0] = -3.0
    for token, weight in tuning.prefer:
        output[index[token], 0] = weight
    # One more constant dimension per pair, set only in the first token's embedding and read
    # only by the second token's output row.
    pairs = {dim: pair for dim, pair in enumerate(tuning.after, start=1)}
    for dim, (first, then) in pairs.items():
        embd[:, dim] = 0.0
        output[:, dim] = 0.0
        embd[index[first], dim] = CONSTANT
        output[index[then], dim] = 10.0
    writer.add_tensor("token_embd.weight", embd.astype(np.float16))
    for layer in range(N_LAYER):
        p = f"blk.{layer}."
        attn_out = rand(N_EMBD, N_EMBD)
        attn_out[0, :] = 0.0  # never writes the constant dimension
        ffn_down = rand(N_EMBD, N_FF)
        ffn_down[0, :] = 0.0
        for dim in pairs:  # nor those of the pairs
            attn_out[dim, :] = 0.0
            ffn_down[dim, :] = 0.0
        writer.add_tensor(p + "attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(p + "attn_q.weight", rand(N_EMBD, N_EMBD).astype(np.float16))
        writer.add_tensor(p + "attn_k.weight", rand(N_EMBD, N_EMBD).astype(np.float16))
        writer.add_tensor(p + "attn_v.weight", rand(N_EMBD, N_EMBD).astype(np.float16))
        writer.add_tensor(p + "attn_output.weight", attn_out.astype(np.float16))
        writer.add_tensor(p + "ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(p + "ffn_gate.weight", rand(N_FF, N_EMBD).astype(np.float16))
        writer.add_tensor(p + "ffn_up.weight", rand(N_FF, N_EMBD).astype(np.float16))
        writer.add_tensor(p + "ffn_down.weight", ffn_down.astype(np.float16))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    writer.add_tensor("output.weight", output.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def make_all(vocab_dir: Path, out_dir: Path) -> dict[str, Path]:
    """Every model of MODELS under `out_dir` (made once; kept between runs)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    for name, (vocab, template, tuning) in MODELS.items():
        path = out_dir / f"{name}.gguf"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            make_model(vocab_dir / vocab, template, tmp, tuning=tuning)
            tmp.rename(path)
        made[name] = path
    return made


if __name__ == "__main__":
    cache = Path(sys.argv[1])
    for name, path in make_all(cache / "vocab", cache / "models").items():
        print(name, path)
