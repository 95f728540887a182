"""What the benchmarks print about where they ran."""


import torch


def test_the_loop_overhead_table_names_the_device_the_loop_ran_on():
    from accelerate import PartialState

    from loop_overhead import described

    assert described(PartialState(cpu=True).device) == f"CPU, {torch.get_num_threads()} threads"
    assert described(torch.device("mps")) == "mps"


def test_the_cpu_memory_column_reads_the_peak_of_what_torch_allocated():
    from memory import peak_cpu

    def run():
        held = torch.empty(2**18)  # 1 MiB, held while a second MiB comes and goes
        torch.empty(2**18)
        return held

    assert peak_cpu(run) == 2 * 2**20
