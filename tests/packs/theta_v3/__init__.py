# a ComfyUI V3 pack: comfy_entrypoint() -> ComfyExtension whose get_node_list() names io.ComfyNode classes
from comfy_api.latest import ComfyExtension, io


class ThetaScale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ThetaScale",
            display_name="Theta Scale",
            category="theta",
            description="Multiplies a number.",
            inputs=[
                io.Int.Input("value", default=2, min=0, max=100, tooltip="the number"),
                io.Combo.Input("mode", options=["double", "triple"]),
                io.Image.Input("image", optional=True),
            ],
            outputs=[io.Int.Output(display_name="scaled"), io.String.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, value, mode, image=None):
        k = 2 if mode == "double" else 3
        return io.NodeOutput(value * k, f"{cls.hidden.unique_id}:{mode}", ui={"text": [str(value * k)]})


class ThetaAsync(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ThetaAsync",
            category="theta",
            inputs=[io.Int.Input("value")],
            outputs=[io.Int.Output()],
        )

    @classmethod
    async def execute(cls, value):
        return io.NodeOutput(value + 1)


class ThetaExtension(ComfyExtension):
    async def get_node_list(self):
        return [ThetaScale, ThetaAsync]


async def comfy_entrypoint():
    return ThetaExtension()
