# one malformed class (skipped and reported), one good class that calls outside the surface when run
import comfy.sd


class Malformed:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": 5}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "f"

    def f(self, x):
        return (x,)


class DeltaLoadsModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {"default": "m.safetensors"})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "delta"

    def load(self, path):
        return (comfy.sd.load_checkpoint_guess_config(path)[0],)


NODE_CLASS_MAPPINGS = {"Malformed": Malformed, "DeltaLoadsModel": DeltaLoadsModel}
