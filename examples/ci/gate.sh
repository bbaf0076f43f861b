#!/usr/bin/env bash
# The release gate, step by step: convert (or take a candidate already made), verify against the
# oracle under the repository's policy, confirm the certificate belongs to these exact files, and
# compare with the last release's certificate. The CI jobs beside this file call it; so can you.
#
#   examples/ci/gate.sh CANDIDATE ORACLE_GGUF
#
# Environment (all optional):
#   NVQ_SOURCE     bf16 checkpoint to convert into CANDIDATE first (else CANDIDATE must exist)
#   NVQ_SCHEME     nvfp4 | mxfp4 | gptq (default nvfp4)     NVQ_RECIPE   recipe file or preset
#   NVQ_POLICY     policy file (default nvq-policy.yaml when present)
#   NVQ_BASELINE   the last release's certificate.json, for nvq diff
#   NVQ_MAX_RATIO  per-layer growth that counts as a regression (default 1.5)
#   NVQ_VERIFY_ARGS  extra arguments for nvq verify (e.g. "--tokens 256 --device cuda")
#   ARTIFACTS      where the certificate, the HTML report and JUnit go (default nvq-artifacts)
# Exit: 0 release may go, 1 the gate failed (certificate, check or regression), 2 bad input.
set -uo pipefail

candidate=${1:?usage: gate.sh CANDIDATE ORACLE_GGUF}
oracle=${2:?usage: gate.sh CANDIDATE ORACLE_GGUF}
nvq=${NVQ:-nvq}
artifacts=${ARTIFACTS:-nvq-artifacts}
policy=${NVQ_POLICY:-}
[[ -z $policy && -f nvq-policy.yaml ]] && policy=nvq-policy.yaml
mkdir -p "$artifacts"

step() { echo "::group::$*" >&2; "$@"; local rc=$?; echo "::endgroup::" >&2; return $rc; }

if [[ -n ${NVQ_SOURCE:-} ]]; then
  step "$nvq" convert "$NVQ_SOURCE" "$candidate" --scheme "${NVQ_SCHEME:-nvfp4}" --force \
    ${NVQ_RECIPE:+--recipe "$NVQ_RECIPE"} --json >"$artifacts/convert.json" || exit $?
fi

# shellcheck disable=SC2086  # NVQ_VERIFY_ARGS is a list of arguments
step "$nvq" verify "$candidate" --oracle "$oracle" ${policy:+--policy "$policy"} ${NVQ_VERIFY_ARGS:-} \
  --json "$artifacts/certificate.json" --markdown "$artifacts/certificate.md" --junit "$artifacts/junit.xml" \
  --html "$artifacts/report.html"
verdict=$?
[[ $verdict -eq 2 ]] && exit 2

# A certificate that passed must also be of these very files; one that failed is still uploaded.
if [[ $verdict -eq 0 ]]; then
  step "$nvq" check "$artifacts/certificate.json" "$candidate" --oracle "$oracle" || exit $?
fi
if [[ -n ${NVQ_BASELINE:-} ]]; then
  step "$nvq" diff "$NVQ_BASELINE" "$artifacts/certificate.json" --max-ratio "${NVQ_MAX_RATIO:-1.5}" \
    | tee "$artifacts/diff.txt"
  [[ ${PIPESTATUS[0]} -ne 0 ]] && exit 1
fi
exit "$verdict"
