"""megatron_lpreg.launch.slurm: sbatch command lines, Slurm env parsing, job states, missing-Slurm errors.
No Slurm needed: where a Slurm command must run, a stand-in executable on PATH plays it (tests/slurm/ has the
real-cluster tests)."""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from megatron_lpreg.launch import slurm
from megatron_lpreg.launch.slurm import (
    REQUEUE_EXIT_CODE,
    SbatchRequest,
    SlurmError,
    SlurmJobEnv,
    TaskState,
    array_spec,
    check_dependency,
    expand_hostlist,
    parse_job_id,
    parse_scontrol_jobs,
    parse_tasks_per_node,
    ray_layout,
)


def _exe(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_requeue_code_is_the_run_directory_contract():
    from megatron_lpreg.rundir import REQUEUE_EXIT_CODE as contract_code

    assert REQUEUE_EXIT_CODE == contract_code == 42


@pytest.mark.parametrize("expr, hosts", [
    ("vm", ["vm"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("a,b[1,3]-ib", ["a", "b1-ib", "b3-ib"]),
])
def test_expand_hostlist(expr, hosts):
    assert expand_hostlist(expr) == hosts


@pytest.mark.parametrize("expr", ["n[1-", "n]1[", "n[a-b]", "n[1-x]"])
def test_expand_hostlist_rejects_malformed(expr):
    with pytest.raises(ValueError, match="hostlist"):
        expand_hostlist(expr)


def test_parse_tasks_per_node():
    assert parse_tasks_per_node("16(x2),8") == [16, 16, 8]
    assert parse_tasks_per_node("4") == [4]
    with pytest.raises(ValueError, match="per-node count"):
        parse_tasks_per_node("4(2)")


def test_job_env_from_environ():
    env = {"SLURM_JOB_ID": "1234", "SLURM_JOB_NAME": "x", "SLURM_ARRAY_JOB_ID": "1200", "SLURM_ARRAY_TASK_ID": "3",
           "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_GPUS_PER_NODE": "h100:8", "SLURM_JOB_CPUS_PER_NODE": "96(x2)",
           "SLURM_RESTART_COUNT": "2", "SLURM_SUBMIT_DIR": "/home/u"}
    job = SlurmJobEnv.from_environ(env)
    assert (job.job_id, job.array_job_id, job.array_task_id, job.restart_count) == ("1234", "1200", 3, 2)
    assert job.nodes == ("gpu01", "gpu02") and job.num_nodes == 2
    assert (job.gpus_per_node, job.cpus_per_node) == (8, 96)
    assert SlurmJobEnv.from_environ({**env, "SLURM_GPUS_ON_NODE": "4"}).gpus_per_node == 4
    bare = SlurmJobEnv.from_environ({"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_GPUS": "0,1,2"})
    assert (bare.array_task_id, bare.restart_count, bare.gpus_per_node, bare.cpus_per_node) == (None, 0, 3, 1)


def test_job_env_outside_a_job_is_a_clear_error():
    with pytest.raises(SlurmError, match="not inside a Slurm job"):
        SlurmJobEnv.from_environ({})


def test_ray_layout_port_ip_and_resources():
    job = SlurmJobEnv.from_environ({"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "n[1-4]",
                                    "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "64"})
    layout = ray_layout(job, {}, resolve={"n1": "10.0.0.1"}.__getitem__)
    assert layout.address == "10.0.0.1:23456"  # 20000 + 123456 % 10000
    assert (layout.head_node, layout.num_nodes, layout.gpus_per_node, layout.cpus_per_node) == ("n1", 4, 8, 64)
    pinned = ray_layout(job, {"MLPREG_RAY_HEAD_IP": "10.1.0.1", "MLPREG_RAY_PORT": "6379"}, resolve=None)
    assert pinned.address == "10.1.0.1:6379"
    with pytest.raises(SlurmError, match="loopback 127.0.1.1.*MLPREG_RAY_HEAD_IP"):
        ray_layout(job, {}, resolve=lambda host: "127.0.1.1")
    single = SlurmJobEnv.from_environ({"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "vm"})
    assert ray_layout(single, {}, resolve=lambda host: "127.0.0.1").head_ip == "127.0.0.1"  # fine on one node


def test_ray_layout_exports_are_valid_bash():
    job = SlurmJobEnv.from_environ({"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_GPUS_ON_NODE": "8"})
    text = ray_layout(job, {"MLPREG_RAY_HEAD_IP": "10.0.0.9"}).shell_exports()
    out = subprocess.run(["bash", "-c", text + 'echo "$MLPREG_RAY_ADDRESS $MLPREG_RAY_NUM_WORKERS '
                                               '$MLPREG_RAY_GPUS_PER_NODE $MLPREG_RAY_HEAD_NODE"'],
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["10.0.0.9:20042", "2", "8", "n1"]


def test_array_spec():
    assert array_spec(6, 2) == "0-5%2"
    assert array_spec(1) == "0-0"
    with pytest.raises(ValueError, match="empty sweep"):
        array_spec(0)
    with pytest.raises(ValueError, match="max-parallel=0"):
        array_spec(3, 0)


def test_sbatch_request_argv_is_exact(tmp_path):
    request = SbatchRequest(script=tmp_path / "s.sbatch", script_args=["/a b"], job_name="j",
                            output="/o/%x-%A_%a.out", array="0-2%1", dependency="afterok:9",
                            export={"MLPREG_ROOT": "/r"}, extra_args=["--time=5"])
    assert request.argv("/usr/bin/sbatch") == [
        "/usr/bin/sbatch", "--parsable", "--job-name=j", "--output=/o/%x-%A_%a.out", "--array=0-2%1",
        "--dependency=afterok:9", "--export=ALL,MLPREG_ROOT=/r", "--time=5", str(tmp_path / "s.sbatch"), "/a b"]
    assert SbatchRequest(script=Path("t")).argv() == ["sbatch", "--parsable", "--job-name=mlpreg", "t"]
    with pytest.raises(ValueError, match="contains ','"):
        SbatchRequest(script=Path("t"), export={"X": "a,b"}).argv()


@pytest.mark.parametrize("text", ["afterok:12", "afterok:12:13,afterany:14", "afterany:5_3", "singleton"])
def test_dependency_accepts(text):
    assert check_dependency(text) == text


@pytest.mark.parametrize("text", ["afterok", "ok:12", "afterok:abc", "12"])
def test_dependency_rejects(text):
    with pytest.raises(ValueError, match="expected e.g. afterok:<jobid>"):
        check_dependency(text)


def test_parse_job_id():
    assert parse_job_id("1234\n") == "1234"
    assert parse_job_id("77;cluster\n") == "77"
    with pytest.raises(SlurmError, match="job id"):
        parse_job_id("sbatch: error\n")


SCONTROL = (
    "JobId=8 ArrayJobId=8 ArrayTaskId=1-3%1 JobName=t UserId=root(0) JobState=PENDING Reason=JobArrayTaskLimit "
    "Requeue=1 Restarts=0 BatchFlag=1 ExitCode=0:0 RunTime=00:00:00\n"
    "JobId=9 ArrayJobId=8 ArrayTaskId=0 JobName=t JobState=RUNNING Reason=None Restarts=0 ExitCode=0:0\n"
    "JobId=10 ArrayJobId=8 ArrayTaskId=4 JobName=t JobState=FAILED Reason=NonZeroExitCode ExitCode=3:0\n"
    "JobId=11 ArrayJobId=8 ArrayTaskId=5 JobName=t JobState=CANCELLED Reason=None ExitCode=0:9\n"
)


def test_parse_scontrol_jobs():
    states = {s.task: s for s in parse_scontrol_jobs(SCONTROL)}
    assert states == {1: TaskState(1, "PENDING", 0), 2: TaskState(2, "PENDING", 0), 3: TaskState(3, "PENDING", 0),
                      0: TaskState(0, "RUNNING", 0), 4: TaskState(4, "FAILED", 3),
                      5: TaskState(5, "CANCELLED", 128 + 9)}
    assert parse_scontrol_jobs("JobId=3 JobName=x JobState=COMPLETED ExitCode=0:0\n") == [TaskState(0, "COMPLETED", 0)]


def test_missing_slurm_names_the_fix(tmp_path):
    with pytest.raises(SlurmError, match=r"'sbatch' not found on PATH.*local-cluster.sh up.*--dry-run"):
        slurm.slurm_command("sbatch", {"PATH": str(tmp_path)})


def test_submit_runs_sbatch_and_reads_the_job_id(tmp_path):
    record = tmp_path / "args.txt"
    _exe(tmp_path / "sbatch", f'printf "%s\\n" "$@" > {record}\necho "4242;c1"\n')
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    job_id = slurm.submit(SbatchRequest(script=Path("/x.sbatch"), array="0-1"), env)
    assert job_id == "4242"
    assert record.read_text().split("\n")[:4] == ["--parsable", "--job-name=mlpreg", "--array=0-1", "/x.sbatch"]
    _exe(tmp_path / "sbatch", 'echo "sbatch: error: invalid partition specified: gpu" >&2\nexit 1\n')
    with pytest.raises(SlurmError, match="sbatch failed \\(exit 1\\): sbatch: error: invalid partition"):
        slurm.submit(SbatchRequest(script=Path("/x.sbatch")), env)


def test_site_environment_returns_what_the_file_sets(tmp_path):
    site = tmp_path / "site.env"
    site.write_text("# comment\nSBATCH_PARTITION=gpu\nexport NCCL_IB_HCA=mlx5\nUNCHANGED=same\n")
    found = slurm.site_environment(site, {"PATH": os.environ["PATH"], "UNCHANGED": "same"})
    assert found == {"SBATCH_PARTITION": "gpu", "NCCL_IB_HCA": "mlx5"}
    with pytest.raises(SlurmError, match="site env file not found"):
        slurm.site_environment(tmp_path / "none.env")
    (tmp_path / "bad.env").write_text("exit 3\n")
    with pytest.raises(SlurmError, match="exit 3"):
        slurm.site_environment(tmp_path / "bad.env")


def test_scripts_dir(tmp_path):
    assert (slurm.scripts_dir({}) / "sweep_array.sbatch").is_file()
    with pytest.raises(SlurmError, match="set MLPREG_ROOT"):
        slurm.scripts_dir({"MLPREG_ROOT": str(tmp_path)})


def test_wait_for_job_polls_until_done_and_tolerates_brief_squeue_failures(tmp_path):
    counter = tmp_path / "n"
    counter.write_text("0")
    # Call 1: two tasks listed; call 2: slurmctld unreachable; call 3: one task; then the job is gone.
    _exe(tmp_path / "squeue", f'n=$(($(cat {counter}) + 1)); echo $n > {counter}\n'
         'case $n in 1) printf "5_0 RUNNING\\n5_1 PENDING\\n";; 2) echo "timeout" >&2; exit 1;; '
         '3) echo "5_1 RUNNING";; *) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1;; esac\n')
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    seen: list[int] = []
    slurm.wait_for_job("5", poll_s=0.01, on_poll=seen.append, env=env)
    assert seen == [2, 1, 0] and counter.read_text().strip() == "4"
    counter.write_text("0")
    with pytest.raises(TimeoutError, match="still has 2 unfinished task"):
        slurm.wait_for_job("5", poll_s=0.01, timeout_s=0.0, env=env)
    _exe(tmp_path / "squeue", 'echo "down" >&2; exit 1\n')
    with pytest.raises(SlurmError, match="squeue -j 5 failed: down"):
        slurm.wait_for_job("5", poll_s=0.001, env=env)
