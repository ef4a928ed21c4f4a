"""Structured output: `response_format` json_object and json_schema by constrained decoding.

A grammar (llguidance, an Earley parser over the tokenizer's token trie) says which tokens may come
next; their complement is set to -inf in the row's logits on rank 0 before sampling, so the output
parses, and with `strict` validates, whatever the model. EOS is allowed exactly where the document
may end. Near max_tokens the document is closed with its shortest ending (`closing.py`) when the
grammar accepts that ending, so a budget cut still gives JSON that parses.

    spec.py      response_format -> JsonSpec (validated; ValueError names the field); no torch
    grammar.py   GrammarCompiler (LRU of compiled grammars per tokenizer), GrammarMatcher (one sequence)
    closing.py   JsonPrefix: the shortest text that completes a JSON prefix
    mask.py      allocate_bitmask, apply_bitmask: the masks on a [S, V] logits tensor
    outputs.py   StructuredOutputs: rank 0's matchers by sequence id, one step's mask and accept

How the engine uses it, per step:
1. Router: `parse_response_format(request.response_format)`; a ValueError is a 400 with param
   "response_format"; the JsonSpec (frozen, hashable, small) goes into the sampling parameters
   (`request.json_spec`); such a request bypasses the semantic cache, whose key does not hold it.
2. Rank 0 builds `StructuredOutputs(GrammarCompiler(tokenizer, vocab_size=logits width,
   eos_token_ids=the model's EOS ids))` next to its sampler, once, on its first constrained row
   (`StepRunner._structured_for`: the tokenizer from the model's own folder).
3. The step input names the constrained rows among the sampled ones and, per row, how many tokens
   it may still generate (tokens_left = min(max_tokens - output tokens, context limit - length));
   the row's JsonSpec travels only on the step that samples its first output token, and rank 0 then
   calls `add(seq_id, spec)` (a preempted sequence keeps its matcher and sends nothing again).
   Only rank 0 reads these fields.
4. On rank 0, in this order: release the sequences that ended (`release`, with the sampler's);
   penalties, logit_bias and min_tokens; `mask(logits, rows, seq_ids, tokens_left)`; temperature,
   top-k, top-p and min-p sampling (a masked token has probability 0); `accept(seq_ids, tokens)`.
   Raw logprobs are taken before all of it, as for the other processors. No constrained row: no cost.
5. `accept` returns, per row, whether the document is complete. The engine then finishes that
   sequence right after appending the token, finish reason "stop" ("length" if `closed_early`),
   without sampling EOS (nothing else could follow). EOS sampled: the usual EOS finish, the
   document being complete. max_tokens reached otherwise (the grammar could not close early, e.g.
   required members missing): "length", and the text is a prefix, as OpenAI and vLLM give it.
   Stop strings still apply and can cut a document; `min_tokens` and `ignore_eos` must not hold EOS
   back on a constrained row (the grammar decides where it ends; a forced EOS would leave no token).
6. Speculative decoding (later): mask every verified position (llguidance fills masks for draft
   tokens) and `matcher(seq_id).rollback(num_rejected)` after verification.
"""

from serving.structured.spec import JsonSpec, parse_response_format

# NOTE: the rest imports torch; the router imports this package for `parse_response_format` only
__all__ = ["JsonSpec", "parse_response_format"]
