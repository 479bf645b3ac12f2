"""The browser demos: a tokenizer tab (an image back from its first k tokens, with PSNR / SSIM) and a generation tab
(class-conditional samples). handlers.py answers the requests with plain functions and imports no Gradio; app.py
lays out the page (Gradio, the optional `demo` extra) and serves it. `semanticist-fast demo` starts it.
"""
