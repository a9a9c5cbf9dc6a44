# a single-file pack that redefines a class of alpha_nested: the pack loaded later wins, as in ComfyUI
class SharedName:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "who"
    CATEGORY = "beta"

    def who(self):
        return ("beta",)


class SaveImage:  # a built-in name: the built-in stays
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ()
    FUNCTION = "nope"

    def nope(self):
        return ()


NODE_CLASS_MAPPINGS = {"SharedName": SharedName, "SaveImage": SaveImage}
