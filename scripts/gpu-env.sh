# Source at the start of every GPU-machine run, from the repository root:
#     source scripts/gpu-env.sh && python bench/kernels.py
# Installs the carried wheels (.whl/: compressed-tensors, torchao and nvq's run-time dependencies
# that the GPU image lacks) into /tmp/site and puts them and this checkout on PYTHONPATH, so that
# `import nvq` works without installing nvq. Prepare .whl/ as bench/kernels.py's docstring says.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD
