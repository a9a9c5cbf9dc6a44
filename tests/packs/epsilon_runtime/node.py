import comfy.sd


class EpsilonPatch:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "epsilon"

    def patch(self, model):
        return (comfy.sd.VAE(model),)
