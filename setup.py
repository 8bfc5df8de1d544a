"""Build hook: compile the .proto files under protos/ into Python modules inside the package.

pyproject.toml contains the project metadata and lists grpcio-tools as a build requirement, so
`pip install .`, `pip wheel .` and `pip install -e .` all run this hook. A wheel gets the generated
modules from the build folder. An editable install gets them next to the sources (such as
extauthz/v1/decision_pb2.py), where .gitignore keeps them out of git. Generated code is never committed.

NOTE: a generated module imports only with a protobuf runtime at least as new as the grpcio-tools
that generated it. The service itself never imports these modules: the readers of the decision log do.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build import build
from setuptools.errors import ExecError

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "protos"
# Paths under protos/; each compiles to the same path under the package root, with _pb2.py.
PROTOS = ("extauthz/v1/decision.proto",)


def generated_module(proto: str) -> str:
    return proto.removesuffix(".proto") + "_pb2.py"


class BuildProtos(Command):
    """The `build_protos` step of `build`, which runs protoc from grpcio-tools on every file in PROTOS."""

    description = "compile the .proto files under protos/ into Python modules"
    user_options: list[tuple[str, str | None, str]] = []

    def initialize_options(self) -> None:
        self.build_lib: str | None = None
        self.editable_mode = False

    def finalize_options(self) -> None:
        self.set_undefined_options("build_py", ("build_lib", "build_lib"))

    def run(self) -> None:
        from grpc_tools import protoc

        output = ROOT if self.editable_mode else Path(self.build_lib)
        for proto in PROTOS:
            (output / generated_module(proto)).parent.mkdir(parents=True, exist_ok=True)
        # The second include folder contains google/protobuf/*.proto, shipped with grpcio-tools.
        well_known = resources.files("grpc_tools") / "_proto"
        arguments = ["grpc_tools.protoc", f"--proto_path={PROTO_ROOT}", f"--proto_path={well_known}",
                     f"--python_out={output}", *(str(PROTO_ROOT / proto) for proto in PROTOS)]
        if protoc.main(arguments) != 0:
            raise ExecError(f"protoc failed on {', '.join(PROTOS)}: its error is printed above")

    def get_source_files(self) -> list[str]:
        return [f"protos/{proto}" for proto in PROTOS]

    def get_outputs(self) -> list[str]:
        return [str(Path(self.build_lib) / generated_module(proto)) for proto in PROTOS]

    def get_output_mapping(self) -> dict[str, str]:
        if not self.editable_mode:
            return {}
        return {str(Path(self.build_lib) / generated_module(proto)): generated_module(proto) for proto in PROTOS}


class Build(build):
    # After build_py, so that a stale module copied from the source tree is overwritten.
    sub_commands = [*build.sub_commands, ("build_protos", None)]


setup(cmdclass={"build": Build, "build_protos": BuildProtos})
