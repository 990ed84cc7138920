#!/bin/bash
# Issue 14, "defaults that hold on heterogeneous data": every table of the simulations README
# section "Defaults on heterogeneous data (issue 14)". Finished runs in $OUT are reused, so an
# interrupted run continues with the same command. Usage (from the repository root):
#   OMP_NUM_THREADS=1 bash simulations/hetero/run.sh
set -euo pipefail
H=simulations/hetero
OUT=${OUT:-runs/hetero}
RESULTS=simulations/results/hetero
FEDSQUEEZE=${FEDSQUEEZE:-fedsqueeze}

# compare NAME FEDERATION SEEDS CONFIG... : one table, runs in $OUT/FEDERATION, copied to
# $RESULTS-NAME
compare() {
  local name=$1 out=$OUT/$2 seeds=$3
  shift 3
  $FEDSQUEEZE compare "$@" --seeds "$seeds" --engine sequential --out "$out"
  mkdir -p "$RESULTS-$name"
  cp "$out/table.md" "$out/results.json" "$RESULTS-$name/"
}

# MNIST-1D / cnn1d, 20 clients, all each round, 20 rounds: the candidates on one seed ...
compare shards-screen shards 1 $H/shards/0[1-4]*.toml
compare dirichlet01-screen dirichlet01 1 $H/dirichlet01/0[134]*.toml
compare iid-screen iid 1 $H/iid/0[134]*.toml
# ... the defaults and lr 0.02 on three seeds (on IID the defaults on three, lr 0.02 on one)
for p in shards dirichlet01; do
  compare "$p" "$p" 3 $H/$p/01-old-defaults.toml $H/$p/06-e5-lr02.toml
done
compare iid iid 3 $H/iid/01-old-defaults.toml
compare iid-lr02 iid 1 $H/iid/01-old-defaults.toml $H/iid/06-e5-lr02.toml
# the defaults without the influence bounds (one seed)
compare shards-no-bounds shards 1 $H/shards/01-old-defaults.toml $H/shards/05-old-defaults-no-bounds.toml
# digits / mlp, 10 clients (the default federation), 20 rounds: candidates on one seed, then
# three seeds
for p in shards dirichlet01 iid; do
  compare "digits-$p-screen" "digits-$p" 1 $H/digits-$p/0[134]*.toml
  compare "digits-$p" "digits-$p" 3 $H/digits-$p/01-old-defaults.toml $H/digits-$p/06-e5-lr02.toml \
    $H/digits-$p/05-old-defaults-no-bounds.toml
done
# FedProx (`strategy = "fedprox"`, 5 local epochs, lr 0.05): proximal-mu 0.01 and 0.1 on one
# seed of shards, then mu 0.01 on three seeds of shards and alpha 0.1 and one seed of IID (the
# defaults' runs above are reused from $OUT)
compare fedprox-shards-screen shards 1 $H/shards/01-old-defaults.toml $H/shards/0[78]*.toml
compare fedprox-iid iid 1 $H/iid/01-old-defaults.toml $H/iid/07-fedprox-mu001.toml
for p in shards dirichlet01; do
  compare "fedprox-$p" "$p" 3 $H/$p/01-old-defaults.toml $H/$p/07-fedprox-mu001.toml
done
# partial participation, 10 of the 20 clients a round: the defaults and FedProx mu 0.01 on three
# seeds
for p in shards dirichlet01; do
  compare "partial-$p" "partial-$p" 3 $H/partial-$p/0[12]*.toml
done

R=$RESULTS
python simulations/hetero/drops.py $R-{shards,dirichlet01,iid}{,-screen} $R-iid-lr02 $R-shards-no-bounds \
  $R-digits-{shards,dirichlet01,iid}{,-screen} | tee "$R-stability.md"
python simulations/hetero/drops.py $R-fedprox-{shards-screen,shards,dirichlet01,iid} \
  $R-partial-{shards,dirichlet01} | tee "$R-fedprox-partial-stability.md"
