"""Drop-in samplers for the libraries people already use: diffusers schedulers (:mod:`.diffusers`),
latent-diffusion's ``DDIMSampler`` (:mod:`.ldm`), k-diffusion samplers (:mod:`.k_diffusion`), the ComfyUI node
(:mod:`.comfy`) and rectified-flow sampling (:mod:`.rf`). Each is a thin layer over :mod:`ddim_gmm_ext.api`;
``_common`` holds their shared option checks. Importing this package imports none of the libraries."""
