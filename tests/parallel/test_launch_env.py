"""Launcher environments: torchrun, bare srun, single process."""

from megatron_internvl.parallel.distributed import expand_slurm_nodelist, read_launch_env


def test_torchrun_env():
    env = read_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                           "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == (
        3, 8, 1, "n1", 1234, "torchrun")


def test_srun_env_derives_master_from_nodelist():
    env = read_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                           "SLURM_NODELIST": "gpu[007-009,012],login1", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (5, 16, 1, "slurm")
    assert env.master_addr == "gpu007"
    assert env.master_port == 20000 + 4242


def test_torchrun_wins_over_slurm_and_single_default():
    env = read_launch_env({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "9", "SLURM_NTASKS": "99"})
    assert env.launcher == "torchrun" and env.world_size == 2
    assert read_launch_env({}).launcher == "single"


def test_expand_nodelist():
    assert expand_slurm_nodelist("a[1-3],b,c[08-10]") == ["a1", "a2", "a3", "b", "c08", "c09", "c10"]
    assert expand_slurm_nodelist("node12") == ["node12"]
    assert expand_slurm_nodelist("x[1,4-5]") == ["x1", "x4", "x5"]
