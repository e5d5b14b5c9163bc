"""torch's threads follow the cores other processes leave free (cores.py)."""

from __future__ import annotations

import sys
import time

import pytest

from tunesmith import cores
from tunesmith.cores import CoreShare, cpu_ticks


class Machine:
    """Fake /proc counters of a 2-core machine at 100 ticks a second, and a settable clock."""

    def __init__(self):
        self.now, self.busy, self.own = 0.0, 0, 0

    def run(self, seconds: float, own_cores: float, other_cores: float) -> None:
        self.now += seconds
        self.own += int(own_cores * 100 * seconds)
        self.busy += int((own_cores + other_cores) * 100 * seconds)


def share(machine: Machine, cores: int = 2):
    calls = []
    s = CoreShare(read=lambda: (machine.busy, machine.own), set_threads=calls.append, cores=cores,
                  clock=lambda: machine.now, cpus=2)
    s.tick = 100
    return s, calls


def test_threads_drop_while_another_process_holds_a_core_and_come_back_after():
    m = Machine()
    s, calls = share(m)
    m.run(2.0, own_cores=2.0, other_cores=0.0)
    assert s.fit() == 2 and calls == []  # alone: every core
    m.run(2.0, own_cores=1.33, other_cores=0.67)  # a busy loop beside: it gets its share of the 2 cores
    assert s.fit() == 1 and calls == [1]
    m.run(0.2, own_cores=1.0, other_cores=1.0)
    assert s.fit() == 1 and calls == [1]  # within EVERY_S: no look, no change
    m.run(2.0, own_cores=1.0, other_cores=1.0)
    assert s.fit() == 1 and calls == [1]  # still there
    m.run(2.0, own_cores=1.0, other_cores=0.2)  # gone (a little noise left)
    assert s.fit() == 2 and calls == [1, 2]


def test_no_adjustment_on_one_core_or_without_proc_counters():
    m = Machine()
    one, calls = share(m, cores=1)
    m.run(2.0, own_cores=0.5, other_cores=1.0)
    assert one.fit() == 1 and calls == [] and not one.enabled
    blind = CoreShare(read=lambda: None, set_threads=calls.append, cores=2)
    assert blind.fit() == 2 and calls == [] and not blind.enabled


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cpu_ticks_counts_this_process_inside_the_machine():
    first = cpu_ticks()
    if first is None:
        pytest.skip("this process may use only some of the machine's CPUs")
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    busy, own = cpu_ticks()
    assert own - first[1] >= 20 and busy - first[0] >= own - first[1] - 5  # ticks of 10 ms, some rounding


def test_every_model_call_of_a_batch_runs_on_the_threads_fit_gives():
    """run_batch asks the core share before each call of a batch, not once per batch: a batch of
    slow calls spans several looks."""
    from tunesmith.serve.model_calls import Pacer, run_batch

    seen = []

    class Cores:
        threads = 2

        def fit(self):
            self.threads = 3 - self.threads  # 1, 2, 1...: each call sees the value in force
            return self.threads

    class Fake:
        labels = ["x"]

        def row_tokens(self, kind, rows):
            return [10] * len(rows)

        def classify(self, texts):
            seen.append((list(texts), cores.threads))
            return [(t, {}) for t in texts]
    cores, pacer = Cores(), Pacer(cap_s=1.0)
    pacer.observe(1, 0.5)  # two rows per call
    run_batch(Fake(), "classify", [["a", "b", "c"]], lambda i, r: None, lambda i: True, budget=1000, pacer=pacer,
              cores=cores)
    assert seen == [(["a", "b"], 1), (["c"], 2)]


def test_fit_threads_shares_one_fitting_and_leaves_accelerators_and_pinned_counts_alone(monkeypatch):
    """Training steps, scoring batches and the server fit the same process-wide CoreShare; on a GPU (its
    CPU threads only feed it) and with OMP_NUM_THREADS set, nothing is fitted."""
    import torch

    looks = []
    monkeypatch.setattr(cores, "_shared", None)
    monkeypatch.setattr(CoreShare, "fit", lambda self: looks.append(self) or 2)
    monkeypatch.setattr(CoreShare, "settle", lambda self: 2)  # no real thread change in the test process
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cores.fit_threads(torch.device("cpu")) is None and cores.shared() is None and looks == []
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cores.fit_threads(torch.device("cpu")) == 2 and cores.fit_threads() == 2
    assert cores.fit_threads(torch.device("meta")) is None  # not a CPU: left alone
    assert len(looks) == 2 and looks[0] is looks[1] is cores.shared()


def test_a_training_step_and_a_scoring_batch_fit_the_threads_first(monkeypatch, tiny_model):
    """train_step and label scoring ask before computing (beside a busy process, a 16-example LoRA run
    of the quickstart model did not finish in 900 s on two threads)."""
    import torch

    from tunesmith.data.examples import Example
    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.tasks.classification import score_labels
    from tunesmith.tasks.prompts import PromptFormat
    from tunesmith.train.batching import collate, encode_for_training
    from tunesmith.train.trainer import train_step

    asked = []
    monkeypatch.setattr(cores, "fit_threads", lambda dev=None: asked.append(str(dev)))
    model, tok = load_model(tiny_model), load_tokenizer(tiny_model)
    fmt = PromptFormat("classification", "Classify.", ["alpha", "beta"], True, 64)
    enc = encode_for_training(tok, fmt, [Example("red card", "alpha", "train"), Example("blue", "beta", "train")])
    batch = collate(enc, tok.pad_token_id)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    train_step(model, iter([batch]), optimizer, params=list(model.parameters()), dev=torch.device("cpu"))
    assert asked == ["cpu"]
    prompts = [e.ids[:e.n_prompt] for e in enc]
    answers = [tok("alpha", add_special_tokens=False)["input_ids"], tok("beta", add_special_tokens=False)["input_ids"]]
    score_labels(model.eval(), prompts * 3, answers, tok.pad_token_id, batch_size=2)
    assert asked == ["cpu"] * 4  # and once per scoring batch of 2


def test_settle_judges_the_first_call_before_it_runs():
    """The first look spans a short wait before the process's first call, so that call already runs on
    the free cores (on too many threads beside a busy process, the first 32.7 s of one training run)."""
    m, calls = Machine(), []

    def read():
        sample = (m.busy, m.own)
        m.run(0.2, own_cores=0.0, other_cores=1.0)  # time passes between looks: a busy loop runs
        return sample
    s = CoreShare(read=read, set_threads=calls.append, cores=2, clock=lambda: m.now, cpus=2)
    s.tick = 100
    assert s.settle(seconds=0.0) == 1 and calls == [1]


def test_a_thread_the_share_has_not_set_gets_the_count_and_a_stale_span_is_looked_at_anew():
    """torch's count is per OS thread: a caller on another thread is given the current count; a span
    longer than STALE_S in which this process was idle is not averaged, but looked at anew (a long busy
    span is judged as it is); others are counted
    against the logical CPUs, capped at torch's own count (one thread per physical core)."""
    m, applied, per_thread = Machine(), [], {"value": 2}

    def set_threads(n):
        applied.append(n)
        per_thread["value"] = n
    s = CoreShare(read=lambda: (m.busy, m.own), set_threads=set_threads, cores=2, clock=lambda: m.now,
                  get_threads=lambda: per_thread["value"], cpus=2)
    s.tick = 100
    m.run(2.0, own_cores=1.0, other_cores=1.0)
    assert s.fit() == 1 and applied == [1]
    per_thread["value"] = 2  # another thread, still at its first count
    assert s.fit() == 1 and applied == [1, 1]
    m.run(600.0, own_cores=0.0, other_cores=0.0)  # idle ten minutes: the neighbour went long ago
    looks = []
    s.read = lambda: looks.append(m.now) or (m.busy, m.own)
    s.fit()
    assert len(looks) == 3  # idle: a short look of its own (two reads), not the ten-minute average
    m.run(10.0, own_cores=1.0, other_cores=0.0)  # one long busy call (a big training step)
    looks.clear()
    s.fit()
    assert len(looks) == 2  # judged as it is: the idle check and one look, no extra wait
    ht = CoreShare(read=lambda: (m.busy, m.own), set_threads=applied.append, cores=2, clock=lambda: m.now, cpus=4)
    assert ht.threads_for(1.0) == 2 and ht.threads_for(2.6) == 1  # 4 logical CPUs, torch on 2 cores


def test_a_neighbour_busy_in_bursts_does_not_flip_the_count_and_room_that_holds_gives_threads_back():
    """Fewer threads at once, more only once the room has held RISE_S: a neighbour alternating half a
    second busy and half a second idle keeps one thread, not a flip at every look."""
    m = Machine()
    s, calls = share(m)
    m.run(0.5, own_cores=1.0, other_cores=1.0)
    assert s.fit() == 1 and calls == [1]  # the drop is immediate
    for _ in range(4):
        m.run(0.5, own_cores=2.0, other_cores=0.0)  # a quiet half second: not enough to rise
        assert s.fit() == 1
        m.run(0.5, own_cores=1.0, other_cores=1.0)
        assert s.fit() == 1
    assert calls == [1]
    m.run(0.5, own_cores=2.0, other_cores=0.0)
    assert s.fit() == 1
    m.run(0.5, own_cores=2.0, other_cores=0.0)  # quiet for cores.RISE_S now
    assert s.fit() == 2 and calls == [1, 2]
    m.run(0.5, own_cores=1.0, other_cores=1.0)
    assert s.fit() == 1 and calls == [1, 2, 1]


def test_a_fresh_look_after_an_idle_span_gives_threads_back_at_once(monkeypatch):
    """After an idle span the short look is all there is to judge by: room it shows is taken at once."""
    m = Machine()
    s, calls = share(m)
    m.run(1.0, own_cores=1.0, other_cores=1.0)
    assert s.fit() == 1
    monkeypatch.setattr(cores.time, "sleep", lambda seconds: m.run(seconds, own_cores=0.0, other_cores=0.0))
    m.run(60.0, own_cores=0.0, other_cores=0.5)
    assert s.fit() == 2 and calls == [1, 2]
