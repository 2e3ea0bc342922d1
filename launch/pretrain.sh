#!/usr/bin/env bash
# launch/pretrain.sh: start cdp-pretrain (python -m cdp_megatron.pretrain) under torchrun on
# one machine, or on one node of a multi-node job (plain variables or SLURM).
#
# Layer: launch/ sits above the entry points; this script only builds a torchrun command
# line. It never imports the package, and --dry-run runs no external program at all.
#
# Why static rendezvous (--master-addr/--master-port/--node-rank) and not --rdzv-*:
# every node knows its rank up front (NODE_RANK or SLURM_NODEID), so the static store is
# deterministic, needs no etcd/c10d rendezvous id, and is what Megatron-LM's own launch
# scripts use. torchrun's default --max-restarts 0 is kept: a failed rank fails the job.
set -euo pipefail

readonly PROG=launch/pretrain.sh
readonly MODULE=cdp_megatron.pretrain
readonly DEFAULT_MASTER_PORT=6000
# The characters Python's shlex.quote leaves unquoted; listed (no ranges) so that the
# match does not depend on the locale.
readonly SAFE_CHARS='abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_@%+=:,./-'

usage() {
    local text
    # read + printf rather than cat: the launcher needs no external program until it execs.
    IFS= read -r -d '' text <<'EOF' || true
Usage: launch/pretrain.sh [--dry-run] [--nproc N] [-h|--help] [--] [cdp-pretrain args ...]

Starts `python -m torch.distributed.run ... -m cdp_megatron.pretrain ARGS` on this node.
Run it once per node (under SLURM: srun --ntasks-per-node=1 launch/pretrain.sh ...).

Launcher options are recognised anywhere before a `--`; every other argument, and
everything after the first `--`, is forwarded to cdp-pretrain verbatim (quoting kept).
With no forwarded arguments at all, the built-in quick start runs (`--quickstart`,
the small CPU example on a machine without a GPU).

  --dry-run   print the exact command (shell-quoted, one line) on stdout and exit 0
  --nproc N   processes on this node (overrides NPROC_PER_NODE and GPU detection)
  -h, --help  show this text and exit

Environment (an empty value counts as unset):
  NNODES          number of nodes                     default 1 (SLURM: SLURM_NNODES)
  NODE_RANK       rank of this node, 0..NNODES-1      default 0 (SLURM: SLURM_NODEID);
                                                      required when NNODES > 1
  MASTER_ADDR     address of node 0                   default 127.0.0.1 on one node
                                                      (SLURM: first host of
                                                      SLURM_JOB_NODELIST); required
                                                      when NNODES > 1
  MASTER_PORT     TCP port on node 0, 1..65535        default 6000
  GPUS_PER_NODE   GPUs (= processes) per node, >= 1   default: SLURM_GPUS_ON_NODE,
                                                      SLURM_GPUS_PER_NODE, else the GPUs
                                                      that nvidia-smi -L lists (limited
                                                      by CUDA_VISIBLE_DEVICES)
  NPROC_PER_NODE  processes per node, >= 1            for CPU runs; default 1 when no
                                                      GPU is found
  PYTHON          interpreter with torch installed    default python (else python3)

SLURM is detected by SLURM_JOB_ID. Explicit NNODES/NODE_RANK that disagree with SLURM's
values are an error (an exported NODE_RANK would reach every node); MASTER_ADDR,
MASTER_PORT and GPUS_PER_NODE override SLURM's values.
Bad or inconsistent settings exit with status 2 and one line on stderr naming the variable.
EOF
    printf '%s' "$text"
}

die() {
    local msg="$PROG: error: $*"
    printf '%s\n' "${msg//$'\n'/\\n}" >&2
    exit 2
}

# quote WORD: print WORD quoted exactly as Python's shlex.quote would, so that
# shlex.split() of the dry-run line gives back the argv.
quote() {
    local word=$1
    if [[ -n $word && $word != *[!$SAFE_CHARS]* ]]; then
        printf '%s' "$word"
    else
        printf "'%s'" "${word//\'/\'\"\'\"\'}"
    fi
}

# count NAME VALUE MIN MAX: check that VALUE is a decimal integer in [MIN, MAX]; REPLY=VALUE
# without leading zeros (bash would read "08" as a bad octal number).
count() {
    local name=$1 value=$2 min=$3 max=$4
    if [[ -z $value || $value == *[!0123456789]* || ${#value} -gt 9 ]]; then
        die "$name=$(quote "$value"): not an integer"
    fi
    REPLY=$((10#$value))
    if ((REPLY < min || REPLY > max)); then
        die "$name=$value: out of range, must be $min..$max"
    fi
}

# first_host LIST: REPLY = the first host of a SLURM hostlist, e.g. "node[07-08,10],gpu1"
# -> "node07". Used when scontrol is not installed (containers, test machines).
first_host() {
    local list=$1 host="" char depth=0 i pre rest inner
    for ((i = 0; i < ${#list}; i++)); do
        char=${list:i:1}
        case $char in
            '[') depth=1 ;;
            ']') depth=0 ;;
            ',') ((depth)) || break ;;
        esac
        host+=$char
    done
    while [[ $host == *'['* ]]; do
        pre=${host%%'['*}
        rest=${host#*'['}
        [[ $rest == *']'* ]] || return 1
        inner=${rest%%']'*}
        inner=${inner%%,*}
        host=$pre${inner%%-*}${rest#*']'}
    done
    [[ -n $host && $host != *[][[:space:]]* ]] || return 1
    REPLY=$host
}

# detect_gpus: REPLY = GPUs this node can use (0 when there is no nvidia-smi).
detect_gpus() {
    local listing line visible
    REPLY=0
    command -v nvidia-smi >/dev/null 2>&1 || return 0
    listing=$(nvidia-smi -L 2>&1) ||
        die "GPUS_PER_NODE: unset and 'nvidia-smi -L' failed; set GPUS_PER_NODE, or --nproc N for a CPU run"
    while IFS= read -r line; do
        [[ $line == 'GPU '[0123456789]* ]] && REPLY=$((REPLY + 1))
    done <<<"$listing"
    # CUDA_VISIBLE_DEVICES set (even to empty) limits what a process may use.
    if ((REPLY > 0)) && [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
        visible=${CUDA_VISIBLE_DEVICES//[[:space:]]/}
        if [[ -z $visible || $visible == -1* ]]; then
            REPLY=0
        else
            IFS=, read -r -a visible <<<"$visible"
            REPLY=${#visible[@]}
        fi
    fi
}

# ---- arguments -----------------------------------------------------------------------
dry_run=0
nproc_opt=""
nproc_opt_given=0
forwarded=()
while (($#)); do
    case $1 in
        --)
            shift
            forwarded+=("$@")
            break
            ;;
        --dry-run) dry_run=1 ;;
        --nproc)
            (($# >= 2)) || die "--nproc: needs a value"
            nproc_opt=$2
            nproc_opt_given=1
            shift
            ;;
        --nproc=*)
            nproc_opt=${1#--nproc=}
            nproc_opt_given=1
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) forwarded+=("$1") ;;
    esac
    shift
done
if ((${#forwarded[@]} == 0)); then
    forwarded=(--quickstart)
fi

# ---- python ----------------------------------------------------------------------------
if [[ -n ${PYTHON:-} ]]; then
    python=$PYTHON
    command -v -- "$python" >/dev/null 2>&1 || die "PYTHON=$(quote "$python"): not found or not executable"
elif command -v python >/dev/null 2>&1; then
    python=python
elif command -v python3 >/dev/null 2>&1; then
    python=python3
else
    die "PYTHON: unset and neither python nor python3 is on PATH; set PYTHON=/path/to/python"
fi

# ---- nodes: plain variables, or SLURM when SLURM_JOB_ID is set -------------------------
slurm=0
[[ -n ${SLURM_JOB_ID:-} ]] && slurm=1

nnodes_name="" nnodes_value=""
if [[ -n ${NNODES:-} ]]; then
    nnodes_name=NNODES nnodes_value=$NNODES
fi
if ((slurm)); then
    # An srun step may span fewer nodes than the job: prefer the step's own variables.
    for name in SLURM_STEP_NUM_NODES SLURM_NNODES; do
        [[ -n ${!name:-} ]] || continue
        count "$name" "${!name}" 1 999999
        slurm_nnodes=$REPLY
        if [[ -n $nnodes_name ]]; then
            count NNODES "$NNODES" 1 999999
            ((REPLY == slurm_nnodes)) || die "NNODES=$NNODES disagrees with $name=$slurm_nnodes"
        else
            nnodes_name=$name nnodes_value=${!name}
        fi
        break
    done
    if [[ -n ${SLURM_STEP_NUM_TASKS:-} && -n ${SLURM_STEP_NUM_NODES:-} &&
        $SLURM_STEP_NUM_TASKS != "$SLURM_STEP_NUM_NODES" ]]; then
        die "SLURM_STEP_NUM_TASKS=$SLURM_STEP_NUM_TASKS with SLURM_STEP_NUM_NODES=$SLURM_STEP_NUM_NODES: run one launcher per node (srun --ntasks-per-node=1)"
    fi
fi
if [[ -n $nnodes_name ]]; then
    count "$nnodes_name" "$nnodes_value" 1 999999
    nnodes=$REPLY
else
    nnodes=1
fi

node_rank=""
if [[ -n ${NODE_RANK:-} ]]; then
    count NODE_RANK "$NODE_RANK" 0 999999
    node_rank=$REPLY
    rank_name=NODE_RANK
fi
if ((slurm)) && [[ -n ${SLURM_NODEID:-} ]]; then
    count SLURM_NODEID "$SLURM_NODEID" 0 999999
    if [[ -n $node_rank ]]; then
        ((node_rank == REPLY)) ||
            die "NODE_RANK=$node_rank disagrees with SLURM_NODEID=$REPLY (unset NODE_RANK: srun copies it to every node)"
    else
        node_rank=$REPLY
        rank_name=SLURM_NODEID
    fi
fi
if [[ -z $node_rank ]]; then
    ((nnodes == 1)) || die "NODE_RANK: required when NNODES=$nnodes > 1 (each node needs its own rank)"
    node_rank=0
    rank_name=NODE_RANK
fi
((node_rank < nnodes)) || die "$rank_name=$node_rank: must be < $nnodes_name=$nnodes"

if [[ -n ${MASTER_ADDR:-} ]]; then
    master_addr=$MASTER_ADDR
elif ((nnodes == 1)); then
    master_addr=127.0.0.1
elif ((slurm)); then
    nodelist_name=""
    for name in SLURM_STEP_NODELIST SLURM_JOB_NODELIST SLURM_NODELIST; do
        if [[ -n ${!name:-} ]]; then
            nodelist_name=$name
            break
        fi
    done
    [[ -n $nodelist_name ]] ||
        die "MASTER_ADDR: unset and SLURM_JOB_NODELIST is missing; set MASTER_ADDR"
    nodelist=${!nodelist_name}
    if command -v scontrol >/dev/null 2>&1; then
        hosts=$(scontrol show hostnames "$nodelist") ||
            die "$nodelist_name=$nodelist: 'scontrol show hostnames' failed; set MASTER_ADDR"
        master_addr=${hosts%%$'\n'*}
    else
        first_host "$nodelist" || die "$nodelist_name=$(quote "$nodelist"): cannot read the first host; set MASTER_ADDR"
        master_addr=$REPLY
    fi
    [[ -n $master_addr ]] || die "$nodelist_name=$nodelist: no host found; set MASTER_ADDR"
else
    die "MASTER_ADDR: required when NNODES=$nnodes > 1 (the address of node 0)"
fi
[[ $master_addr != *[[:space:]]* ]] || die "MASTER_ADDR=$(quote "$master_addr"): contains whitespace"

count MASTER_PORT "${MASTER_PORT:-$DEFAULT_MASTER_PORT}" 1 65535
master_port=$REPLY

# ---- processes per node ----------------------------------------------------------------
nproc_name=""
if ((nproc_opt_given)); then
    count --nproc "$nproc_opt" 1 4096
    nproc_name=--nproc nproc=$REPLY
elif [[ -n ${NPROC_PER_NODE:-} ]]; then
    count NPROC_PER_NODE "$NPROC_PER_NODE" 1 4096
    nproc_name=NPROC_PER_NODE nproc=$REPLY
fi
if [[ -n ${GPUS_PER_NODE:-} ]]; then
    # Setting GPUS_PER_NODE declares a GPU run: 0 GPUs is a mistake, not a CPU run.
    count GPUS_PER_NODE "$GPUS_PER_NODE" 1 4096
    if [[ -n $nproc_name ]]; then
        ((nproc == REPLY)) || die "GPUS_PER_NODE=$REPLY disagrees with $nproc_name=$nproc; set only one"
    else
        nproc_name=GPUS_PER_NODE nproc=$REPLY
    fi
fi
if [[ -z $nproc_name ]] && ((slurm)); then
    if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
        count SLURM_GPUS_ON_NODE "$SLURM_GPUS_ON_NODE" 0 4096
        ((REPLY == 0)) || nproc_name=SLURM_GPUS_ON_NODE nproc=$REPLY
    elif [[ -n ${SLURM_GPUS_PER_NODE:-} ]]; then
        # --gpus-per-node=[type:]count
        count SLURM_GPUS_PER_NODE "${SLURM_GPUS_PER_NODE##*:}" 0 4096
        ((REPLY == 0)) || nproc_name=SLURM_GPUS_PER_NODE nproc=$REPLY
    fi
fi
if [[ -z $nproc_name ]]; then
    detect_gpus
    nproc=$((REPLY > 0 ? REPLY : 1))
fi

# ---- command ---------------------------------------------------------------------------
cmd=(
    "$python" -m torch.distributed.run
    --nnodes "$nnodes" --node-rank "$node_rank" --nproc-per-node "$nproc"
    --master-addr "$master_addr" --master-port "$master_port"
    -m "$MODULE" "${forwarded[@]}"
)
line=""
for word in "${cmd[@]}"; do
    line+="${line:+ }$(quote "$word")"
done

if ((dry_run)); then
    printf '%s\n' "$line"
    exit 0
fi

# One clear line here instead of one traceback per worker.
missing=$("$python" -c 'import importlib.util as u
print(" ".join(m for m in ("torch", "cdp_megatron") if u.find_spec(m) is None))') ||
    die "PYTHON=$(quote "$python"): failed to run"
[[ -z $missing ]] ||
    die "PYTHON=$(quote "$python") cannot import: $missing (pip install -e '.[megatron]' in the repository)"

printf '%s: node %s of %s, %s process(es), master %s:%s\n+ %s\n' \
    "$PROG" "$node_rank" "$nnodes" "$nproc" "$master_addr" "$master_port" "$line" >&2
exec "${cmd[@]}"
