"""An image folder, searched recursively; class labels from first-level sub-folders."""
import os

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def list_image_files(root):
    """Every image file under ``root`` (any depth), sorted for a stable order."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        found.extend(os.path.join(folder, name) for name in files
                     if name.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(found)


class ImageFolder:
    """The images under a folder as (path, label) pairs.

    With ``class_cond`` the label of an image is the id of the first-level
    sub-folder it lies in, ids given to the sorted sub-folder names
    (``root/cat/x.png`` → class "cat"); otherwise every label is 0.
    """

    def __init__(self, root, class_cond=False):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist; set data.path to a "
                                    "folder of .png/.jpg/.jpeg/.webp images")
        paths = list_image_files(root)
        if not paths:
            raise ValueError(f"image folder {root!r} holds no .png/.jpg/.jpeg/.webp files "
                             "(searched recursively); point data.path at your images")
        self.root = root
        self.paths = paths
        self.class_names = []
        self.labels = [0] * len(paths)
        if class_cond:
            self._label_by_subfolder()

    def _label_by_subfolder(self):
        top_level = [os.path.relpath(path, self.root).split(os.sep)[0] for path in self.paths]
        loose = [path for path, part in zip(self.paths, top_level)
                 if os.path.dirname(os.path.relpath(path, self.root)) == ""]
        if loose:
            raise ValueError(f"class-conditional data needs every image inside a class "
                             f"sub-folder of {self.root!r}, but {len(loose)} lie directly in it "
                             f"(e.g. {loose[0]!r}); move them into sub-folders or set "
                             "model.class_cond=false")
        self.class_names = sorted(set(top_level))
        ids = {name: i for i, name in enumerate(self.class_names)}
        self.labels = [ids[part] for part in top_level]

    def __len__(self):
        return len(self.paths)
