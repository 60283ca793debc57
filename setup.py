"""Build and install cprec-kernels (the ``cprec_kernels`` library and the ``cprec`` app).

C++/CUDA extensions are collected by ``_extensions()``; they need torch at build time,
so install with ``pip install --no-build-isolation`` (a build-isolated install would
download a CUDA build of torch). ``CPREC_NO_EXT=1`` skips every extension.
"""
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cpu_sources():
    """The C++ sources of the cpu backend, relative to ROOT (setuptools wants them so)."""
    cpu = os.path.join("csrc", "cpu")
    names = sorted(n for n in os.listdir(os.path.join(ROOT, cpu)) if n.endswith(".cpp"))
    return [os.path.join("csrc", "bindings.cpp")] + [os.path.join(cpu, n) for n in names]


def _extensions():
    """-> (ext_modules, cmdclass): the cpu backend ``cprec_kernels._C``, plus the cuda
    backend ``cprec_kernels._C_cuda`` where ``_cuda_extension`` can build it.

    OpenMP drives ``at::parallel_for``; ``CPREC_NATIVE=1`` adds ``-march=native`` for a
    machine-local build (off by default so a built wheel runs on any x86-64).
    """
    csrc = os.path.join(ROOT, "csrc")
    if os.environ.get("CPREC_NO_EXT") == "1" or not os.path.isdir(os.path.join(csrc, "cpu")):
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension  # needs torch at build time

    cflags = ["-O3", "-g0", "-fopenmp"]  # -g0: python's default -g doubles the compile time
    if os.environ.get("CPREC_NATIVE") == "1":
        cflags.append("-march=native")
    ext = CppExtension(
        "cprec_kernels._C",
        _cpu_sources(),
        include_dirs=[csrc],
        extra_compile_args={"cxx": cflags},
        extra_link_args=["-fopenmp"],
    )
    exts = [ext]
    cuda_ext = _cuda_extension(csrc)
    if cuda_ext is not None:
        exts.append(cuda_ext)
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


# sm_80 (A100) and sm_90 (H100/H200) SASS; -gencode given here replaces torch's
# TORCH_CUDA_ARCH_LIST defaults.
CUDA_ARCH_FLAGS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


def _cuda_extension(csrc):
    """The CUDAExtension ``cprec_kernels._C_cuda`` (csrc/cuda: kernels + ATen glue), or None.

    Built only when the installed torch is a CUDA build (``torch.version.cuda``) and
    torch finds nvcc (``CUDA_HOME``: the environment variable, else nvcc on PATH, else
    /usr/local/cuda): the CPU build of torch lacks the CUDA headers the glue needs.
    Otherwise the cpu-only build is exactly what it was, and ``backend="cuda"`` raises a
    RuntimeError that says why.
    """
    import torch

    cuda_dir = os.path.join(csrc, "cuda")
    if torch.version.cuda is None or not os.path.isdir(cuda_dir):
        return None
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension

    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return None
    names = sorted(n for n in os.listdir(cuda_dir) if n.endswith((".cu", ".cpp")))
    return CUDAExtension(
        "cprec_kernels._C_cuda",
        [os.path.join("csrc", "cuda", n) for n in names],
        include_dirs=[csrc],
        extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": ["-O3"] + CUDA_ARCH_FLAGS},
    )


ext_modules, cmdclass = _extensions()

setup(
    name="cprec-kernels",
    version="0.1.0",
    description="Fused kernels and the CpRec model for compressed sequential recommenders",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=[
        "cprec_kernels",
        "cprec_kernels._core",
        "cprec_kernels.adaptive_softmax",
        "cprec_kernels.conv",
        "cprec_kernels.embedding",
        "cprec",
        "cprec.datasets",
    ],
    package_dir={"cprec": "python/cprec", "cprec.datasets": "python/cprec/datasets"},
    package_data={"cprec.datasets": ["ml-latest-small/*"]},
    # torch is pinned by the user's install command (the CPU build: torch==2.13.0);
    # a bare "torch" here would let pip pull a multi-GB CUDA build.
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "triton": ["triton>=3.2"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["cprec=cprec.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
