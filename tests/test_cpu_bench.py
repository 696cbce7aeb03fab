"""experiments.cpu_bench's host-side pieces (the end-to-end run is the slow
`test_real_model.test_cpu_bench_runs_both_scenarios`)."""

from experiments.cpu_bench import output_lengths, run_interleaved


class _Side:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def call(self):
        self.log.append(self.name)
        return 0.0


def test_run_interleaved_alternates_the_sides_call_by_call():
    log = []
    run_interleaved([_Side("engine", log), _Side("transformers", log)], reps=3)
    assert log == ["engine", "transformers"] * 3


def test_output_lengths_fixed_and_mixed():
    assert output_lengths("fixed", 4, 64, 0) == [64] * 4
    mixed = output_lengths("mixed", 200, 64, 0)
    assert min(mixed) >= 16 and max(mixed) <= 112 and len(set(mixed)) > 10
    assert mixed == output_lengths("mixed", 200, 64, 0)  # seeded
