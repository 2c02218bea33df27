"""Write the image's requirement files from pyproject.toml's own pins (run in
the Containerfile's builder stage): requirements.txt holds the runtime
dependencies, requirements-protoc.txt grpcio-tools from the dev extra, for the
code generation only."""

import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
with open("requirements.txt", "w") as f:
    f.write("\n".join(project["dependencies"]) + "\n")
tools = [d for d in project["optional-dependencies"]["dev"] if d.startswith("grpcio-tools==")]
assert tools, "grpcio-tools is pinned in the dev extra"
with open("requirements-protoc.txt", "w") as f:
    f.write("\n".join(tools) + "\n")
