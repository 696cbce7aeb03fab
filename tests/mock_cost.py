"""A mock step-cost model for scheduler and simulator tests (not a real cost model):
prefill 1 ms per token, decode 2 ms per step, so every schedule is hand-computable."""


class FixedCost:
    def prefill_time(self, model, num_tokens, num_seqs=1):
        return 1e-3 * num_tokens

    def decode_time(self, model, batch, context=0.0):
        return 2e-3

    def observe(self, *a):
        pass
