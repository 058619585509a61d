#!/bin/sh
# Installs the Debian packages medsamix.h needs when they are missing: as root
# with apt-get, otherwise prints the exact command to run. Idempotent.
# Open MPI (for `make mpi` and the MPI test) is installed too when running as
# root; without it `make test` still works (the MPI test prints a skip line).
# MSX_MPI=1 (make mpi): Open MPI is required.
set -e
need=""
[ -f /usr/include/dnnl.h ] || need="$need libdnnl-dev"
[ -f /usr/include/stb/stb_image.h ] || need="$need libstb-dev"
[ -f /usr/include/nifti/nifti2_io.h ] || need="$need libnifti2-dev libniftiio-dev libznz-dev"
[ -f /usr/include/zlib.h ] || need="$need zlib1g-dev"
command -v gcc >/dev/null 2>&1 || need="$need gcc"
command -v g++ >/dev/null 2>&1 || need="$need g++"
command -v make >/dev/null 2>&1 || need="$need make"
mpi=""
command -v mpicc >/dev/null 2>&1 || mpi="$mpi libopenmpi-dev"
command -v mpirun >/dev/null 2>&1 || mpi="$mpi openmpi-bin"
if [ "$(id -u)" = 0 ] || [ "${MSX_MPI:-0}" = 1 ]; then need="$need$mpi"; fi
[ -n "$need" ] || exit 0
if [ "$(id -u)" = 0 ]; then
    echo "medsamix: installing Debian packages:$need"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $need
else
    echo "medsamix: missing Debian packages. Run:"
    echo "  sudo apt-get install -y$need"
    exit 1
fi
