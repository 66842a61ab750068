"""The quality harness: shipped digits models and their training (:mod:`.digits`), the analytic
exact-denoiser mixture (:mod:`.analytic`), digits-FD / precision / recall (:mod:`.metrics`), sampling loops
over the shipped models (:mod:`.sampling`) and the evaluation sweep behind ``ddim-gmm eval``
(:mod:`.evaluate`), and the ``ddim-gmm demo`` job (:mod:`.demo`)."""
