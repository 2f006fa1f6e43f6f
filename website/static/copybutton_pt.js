// sphinx-copybutton has no Portuguese words: add them and use them (runs after copybutton.js,
// before the buttons are made when the page has loaded).
if (typeof messages !== "undefined") {
  messages["pt-BR"] = {
    copy: "Copiar",
    copy_to_clipboard: "Copiar para a área de transferência",
    copy_success: "Copiado!",
    copy_failure: "Não foi possível copiar",
  };
  locale = "pt-BR";
}
